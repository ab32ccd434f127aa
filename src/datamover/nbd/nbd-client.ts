import { createConnection, type Socket } from 'node:net';
import { SnapshiftError } from '../../core/errors.ts';
import { negotiate, type HandshakeChannel, type NegotiatedExport } from './nbd-handshake.ts';
import { command, commandFlag, requestHeaderBytes, requestMagic, transmissionFlag } from './nbd-protocol.ts';
import { NbdReplyParser, type Extent, type InFlightRequest } from './nbd-reply-parser.ts';

export type { Extent } from './nbd-reply-parser.ts';

export interface NbdConnectOptions {
  /** Unix socket of the NBD server; or `host` and `port` for TCP. */
  socketPath?: string;
  host?: string;
  port?: number;
  /** Default "" (the server's default export). */
  exportName?: string;
  /** Meta contexts to negotiate, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`. */
  metaContexts?: readonly string[];
  /** Accept a server that grants fewer contexts than asked (default: fail with NBD_META_CONTEXT_UNAVAILABLE). */
  allowMissingMetaContexts?: boolean;
  /** Budget for connecting and negotiating; default 10 s. */
  timeoutMs?: number;
  /**
   * Reads larger than this go out as several requests into one buffer; default 256 KiB, where
   * qemu's NBD server spends the least CPU per byte (1 MiB requests cost it about twice as much).
   */
  maxRequestBytes?: number;
  /** Size of the reused socket read buffer; default 1 MiB. */
  readBufferBytes?: number;
}

const defaultMaxRequestBytes = 256 * 1024;
/** Below this many payload bytes left, reading into the scratch buffer (several replies at once) wins. */
const directReadMinBytes = 64 * 1024;
export interface ReadOptions {
  /**
   * NBD_CMD_FLAG_DF: the server answers with one data chunk, holes included as zeros. Besides, qemu
   * 7.2's server reports a read error as an error reply only then; on a fragmented (sparse) read it
   * drops the connection instead, which we surface as NBD_DISCONNECTED.
   */
  dontFragment?: boolean;
}

/** Block status requests ask for at most this much (aligned; the request length field is 32 bits). */
const defaultMaxBlockStatusBytes = 2 ** 31;

/**
 * Our NBD client (NBD spec, NetworkBlockDevice/nbd doc/proto.md): fixed newstyle handshake, structured
 * replies, meta contexts, and a pipelined transmission phase where any number of READ, WRITE and
 * BLOCK_STATUS requests are in flight, matched to replies by cookie. The caller bounds concurrency.
 */
export class NbdClient implements AsyncDisposable {
  readonly #socket: Socket;
  readonly #where: string;
  readonly #inFlight = new Map<number, InFlightRequest>();
  readonly #parser: NbdReplyParser;
  #nextCookie = 1;
  #closed = false;
  #closing: Promise<void> | undefined;
  #failure: SnapshiftError | undefined;
  #negotiated!: NegotiatedExport;
  #maxRequestBytes = defaultMaxRequestBytes;
  /** Largest BLOCK_STATUS request we send; a multiple of the minimum block size. */
  maxBlockStatusBytes = defaultMaxBlockStatusBytes;

  private constructor(socket: Socket, where: string) {
    this.#socket = socket;
    this.#where = where;
    this.#parser = new NbdReplyParser(
      (cookie) => this.#inFlight.get(cookie),
      (request) => {
        this.#inFlight.delete(request.cookie);
        request.settle(request.error);
      },
    );
  }

  /** Connects, negotiates and enters the transmission phase. */
  static async connect(options: NbdConnectOptions): Promise<NbdClient> {
    const exportName = options.exportName ?? '';
    const where = options.socketPath ? `NBD server ${options.socketPath}` : `NBD server ${options.host ?? 'localhost'}:${options.port ?? 10809}`;
    const timeoutMs = options.timeoutMs ?? 10_000;
    const scratch = Buffer.allocUnsafe(options.readBufferBytes ?? 1024 * 1024);
    // Node reads into the buffer `buffer()` returns: our scratch buffer, or, in the middle of a large
    // data payload, the caller's target itself (kernel -> target, no copy in JS).
    let onBytes: (bytes: Buffer) => void = () => undefined;
    let client: NbdClient | undefined;
    let direct = false;
    const onread = {
      buffer: (): Uint8Array => {
        const target = client === undefined ? undefined : client.#parser.directReadTarget(directReadMinBytes);
        direct = target !== undefined;
        return target ?? scratch;
      },
      callback: (length: number): boolean => {
        if (direct) client!.#onDirectBytes(length);
        else onBytes(scratch.subarray(0, length));
        return true;
      },
    };
    const socket = options.socketPath
      ? createConnection({ path: options.socketPath, onread })
      : createConnection({ host: options.host ?? 'localhost', port: options.port ?? 10809, onread });
    client = new NbdClient(socket, where);
    const handshake = new SocketHandshake(socket, where);
    onBytes = (bytes) => handshake.push(bytes);
    const timer = setTimeout(() => handshake.fail(new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} did not complete the NBD handshake within ${timeoutMs} ms`)), timeoutMs);
    try {
      await handshake.connected;
      socket.setNoDelay(true);
      client.#negotiated = await negotiate(handshake, exportName, options.metaContexts ?? [], where);
    } catch (error) {
      socket.destroy();
      throw error;
    } finally {
      clearTimeout(timer);
    }
    handshake.detach();
    const missing = (options.metaContexts ?? []).filter((name) => !client.#negotiated.metaContexts.has(name));
    if (missing.length > 0 && !options.allowMissingMetaContexts) {
      await client.close();
      throw new SnapshiftError(
        'NBD_META_CONTEXT_UNAVAILABLE',
        `${where} export "${exportName}" does not offer ${missing.join(', ')}${client.#negotiated.structuredReplies ? '' : ' (no structured replies)'}; for a dirty bitmap, export it with block-export-add bitmaps=[...]`,
      );
    }
    const minBlock = Math.max(1, client.#negotiated.minBlockBytes);
    const requestBytes = Math.min(options.maxRequestBytes ?? defaultMaxRequestBytes, client.#negotiated.maxPayloadBytes);
    client.#maxRequestBytes = Math.max(minBlock, Math.floor(requestBytes / minBlock) * minBlock);
    client.maxBlockStatusBytes = Math.floor(defaultMaxBlockStatusBytes / minBlock) * minBlock;
    onBytes = (bytes) => client.#onBytes(bytes);
    socket.on('error', (error) => client.#fail(new SnapshiftError('NBD_DISCONNECTED', `${where} connection failed: ${error.message}`, { cause: error })));
    socket.on('close', () => client.#fail(new SnapshiftError('NBD_DISCONNECTED', `${where} closed the connection`)));
    return client;
  }

  /** Export size in bytes. */
  get sizeBytes(): number {
    return this.#negotiated.sizeBytes;
  }

  /** Meta context name -> id, as the server granted them. */
  get metaContexts(): ReadonlyMap<string, number> {
    return this.#negotiated.metaContexts;
  }

  get readOnly(): boolean {
    return (this.#negotiated.transmissionFlags & transmissionFlag.readOnly) !== 0;
  }

  /** NBD_FLAG_* bits of the export. */
  get transmissionFlags(): number {
    return this.#negotiated.transmissionFlags;
  }

  get structuredReplies(): boolean {
    return this.#negotiated.structuredReplies;
  }

  /** The server's block size limits (NBD_INFO_BLOCK_SIZE); requests we split respect `maxPayloadBytes`. */
  get blockSize(): { minBytes: number; preferredBytes: number; maxPayloadBytes: number } {
    const n = this.#negotiated;
    return { minBytes: n.minBlockBytes, preferredBytes: n.preferredBlockBytes, maxPayloadBytes: n.maxPayloadBytes };
  }

  /** Requests sent and not yet answered. */
  get inFlightCount(): number {
    return this.#inFlight.size;
  }

  /** Reads `lengthBytes` at `offsetBytes`; holes come back as zeros. */
  async read(offsetBytes: number, lengthBytes: number, options: ReadOptions = {}): Promise<Buffer> {
    const target = Buffer.allocUnsafe(lengthBytes);
    await this.readInto(offsetBytes, target, options);
    return target;
  }

  /** Reads `target.length` bytes at `offsetBytes` into `target` (a caller-owned, reusable buffer). */
  async readInto(offsetBytes: number, target: Buffer, options: ReadOptions = {}): Promise<void> {
    this.#checkRange(offsetBytes, target.length);
    const flags = options.dontFragment ? commandFlag.df : 0;
    const max = this.#maxRequestBytes;
    if (target.length <= max) return this.#send(command.read, offsetBytes, target.length, { target, flags });
    const parts: Promise<void>[] = [];
    for (let at = 0; at < target.length; at += max) {
      const length = Math.min(max, target.length - at);
      parts.push(this.#send(command.read, offsetBytes + at, length, { target: target.subarray(at, at + length), flags }));
    }
    await Promise.all(parts);
  }

  /** Writes `data` at `offsetBytes`; `fua` asks the server to make it durable before answering. */
  async write(offsetBytes: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    if (this.readOnly) throw new SnapshiftError('NBD_READ_ONLY', `${this.#where} export is read-only`);
    this.#checkRange(offsetBytes, data.length);
    const flags = options.fua && (this.transmissionFlags & transmissionFlag.sendFua) !== 0 ? commandFlag.fua : 0;
    const max = this.#maxRequestBytes;
    const parts: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += max) {
      const length = Math.min(max, data.length - at);
      parts.push(this.#send(command.write, offsetBytes + at, length, { payload: data.subarray(at, at + length), flags }));
    }
    await Promise.all(parts);
  }

  /** Makes completed writes durable (no-op when the server does not support NBD_CMD_FLUSH). */
  async flush(): Promise<void> {
    if ((this.transmissionFlags & transmissionFlag.sendFlush) === 0) return;
    await this.#send(command.flush, 0, 0, {});
  }

  /**
   * Extents of `contextName` covering exactly [offsetBytes, offsetBytes + lengthBytes): asks again where
   * the server answered for less, and clips an extent that runs past the end.
   */
  async blockStatus(offsetBytes: number, lengthBytes: number, contextName: string): Promise<Extent[]> {
    const extents: Extent[] = [];
    for await (const extent of this.extents(contextName, { offset: offsetBytes, length: lengthBytes })) extents.push(extent);
    return extents;
  }

  /** Walks the extents of `contextName` over a range (default the whole export), one request at a time. */
  async *extents(contextName: string, range: { offset?: number; length?: number } = {}): AsyncGenerator<Extent> {
    const contextId = this.#negotiated.metaContexts.get(contextName);
    if (contextId === undefined) {
      throw new SnapshiftError('NBD_META_CONTEXT_UNAVAILABLE', `${this.#where}: meta context ${contextName} was not negotiated (asked: ${[...this.metaContexts.keys()].join(', ') || 'none'})`);
    }
    const start = range.offset ?? 0;
    const end = start + (range.length ?? this.sizeBytes - start);
    this.#checkRange(start, end - start);
    let offset = start;
    while (offset < end) {
      const length = Math.min(end - offset, this.maxBlockStatusBytes);
      const request = await this.#blockStatusOnce(offset, length, contextId);
      if (request.length === 0) throw new SnapshiftError('NBD_PROTOCOL_ERROR', `${this.#where} answered block status at ${offset} with no extents for ${contextName}`);
      for (const extent of request) {
        if (extent.length === 0) continue;
        const length = Math.min(extent.length, end - extent.offset);
        yield length === extent.length ? extent : { offset: extent.offset, length, flags: extent.flags };
        offset = extent.offset + length;
        if (offset >= end) break;
      }
    }
  }

  /** Waits for requests in flight, says NBD_CMD_DISC and closes the socket. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  async #close(): Promise<void> {
    // Requests in flight are answered first: the spec lets a server drop them after NBD_CMD_DISC.
    await Promise.allSettled([...this.#inFlight.values()].map((request) => new Promise<void>((resolve) => {
      const settle = request.settle;
      request.settle = (error) => {
        settle(error);
        resolve();
      };
    })));
    if (this.#closed) return;
    const closed = new Promise<void>((resolve) => this.#socket.once('close', () => resolve()));
    this.#socket.end(this.#header(command.disconnect, 0, 0, 0, 0));
    const timer = setTimeout(() => this.#socket.destroy(), 2_000);
    await closed;
    clearTimeout(timer);
  }

  async #blockStatusOnce(offsetBytes: number, lengthBytes: number, contextId: number): Promise<Extent[]> {
    const holder: { extents?: Extent[] } = {};
    await this.#send(command.blockStatus, offsetBytes, lengthBytes, { contextId, holder });
    return holder.extents ?? [];
  }

  #send(
    type: number,
    offsetBytes: number,
    lengthBytes: number,
    options: { target?: Buffer; payload?: Buffer; flags?: number; contextId?: number; holder?: { extents?: Extent[] } },
  ): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#closing && type !== command.disconnect) return Promise.reject(new SnapshiftError('NBD_DISCONNECTED', `${this.#where}: the client is closing`));
    const cookie = this.#takeCookie();
    return new Promise<void>((resolve, reject) => {
      const request: InFlightRequest = {
        cookie,
        command: type,
        offsetBytes,
        lengthBytes,
        coveredBytes: 0,
        settle: (error) => {
          if (error) return reject(error);
          if (options.holder) options.holder.extents = request.extents;
          resolve();
        },
      };
      if (options.target) request.target = options.target;
      if (options.contextId !== undefined) request.contextId = options.contextId;
      this.#inFlight.set(cookie, request);
      const header = this.#header(type, options.flags ?? 0, cookie, offsetBytes, lengthBytes);
      if (options.payload && options.payload.length > 0) {
        this.#socket.cork();
        this.#socket.write(header);
        this.#socket.write(options.payload);
        this.#socket.uncork();
      } else {
        this.#socket.write(header);
      }
    });
  }

  #header(type: number, flags: number, cookie: number, offsetBytes: number, lengthBytes: number): Buffer {
    const header = Buffer.allocUnsafe(requestHeaderBytes);
    header.writeUInt32BE(requestMagic, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeUInt32BE(0, 8);
    header.writeUInt32BE(cookie, 12);
    header.writeUInt32BE(Math.floor(offsetBytes / 2 ** 32), 16);
    header.writeUInt32BE(offsetBytes >>> 0, 20);
    header.writeUInt32BE(lengthBytes, 24);
    return header;
  }

  #takeCookie(): number {
    // 32-bit cookies wrap; skip any still in flight (practically never).
    do {
      this.#nextCookie = this.#nextCookie >= 0xffff_ffff ? 1 : this.#nextCookie + 1;
    } while (this.#inFlight.has(this.#nextCookie));
    return this.#nextCookie;
  }

  #checkRange(offsetBytes: number, lengthBytes: number): void {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new SnapshiftError('BAD_ARGUMENT', `range ${offsetBytes}+${lengthBytes} is outside the ${this.sizeBytes}-byte export of ${this.#where}`);
    }
  }

  #onDirectBytes(length: number): void {
    if (this.#failure) return;
    this.#parser.advanceDirect(length);
  }

  #onBytes(bytes: Buffer): void {
    if (this.#failure) return;
    try {
      this.#parser.feed(bytes);
    } catch (error) {
      this.#fail(error instanceof SnapshiftError ? error : new SnapshiftError('NBD_PROTOCOL_ERROR', String(error)));
      this.#socket.destroy();
    }
  }

  #fail(error: SnapshiftError): void {
    this.#closed = true;
    this.#failure ??= error;
    for (const request of this.#inFlight.values()) request.settle(this.#failure);
    this.#inFlight.clear();
  }
}

/** Negotiation reads: buffers what arrives and hands out exact byte counts. */
class SocketHandshake implements HandshakeChannel {
  readonly connected: Promise<void>;
  #buffered: Buffer = Buffer.alloc(0);
  #waiter: { length: number; resolve: (bytes: Buffer) => void; reject: (error: Error) => void } | undefined;
  #failure: Error | undefined;
  readonly #onError: (error: NodeJS.ErrnoException) => void;
  readonly #onClose: () => void;

  constructor(
    private readonly socket: Socket,
    private readonly where: string,
  ) {
    this.connected = new Promise((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', (error: NodeJS.ErrnoException) => {
        const why = error.code === 'ENOENT' ? 'no such socket' : error.code === 'ECONNREFUSED' ? 'connection refused' : error.message;
        reject(new SnapshiftError('NBD_CONNECT_FAILED', `cannot connect to ${where}: ${why}`, { cause: error }));
      });
    });
    this.connected.catch(() => undefined);
    this.#onError = (error) => this.fail(new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} failed during the NBD handshake: ${error.message}`, { cause: error }));
    this.#onClose = () => this.fail(new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} closed the connection during the NBD handshake (unknown export, or not an NBD server?)`));
    socket.on('error', this.#onError);
    socket.on('close', this.#onClose);
  }

  push(bytes: Buffer): void {
    // Copy: `bytes` is a view into the socket's reused read buffer.
    this.#buffered = Buffer.concat([this.#buffered, bytes]);
    this.#serve();
  }

  readExactly(length: number): Promise<Buffer> {
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      this.#waiter = { length, resolve, reject };
      this.#serve();
    });
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  fail(error: Error): void {
    this.#failure ??= error;
    this.#waiter?.reject(error);
    this.#waiter = undefined;
    this.socket.destroy();
  }

  detach(): void {
    this.socket.off('error', this.#onError);
    this.socket.off('close', this.#onClose);
    if (this.#buffered.length > 0) this.fail(new SnapshiftError('NBD_PROTOCOL_ERROR', `${this.where} sent unexpected bytes after the handshake`));
  }

  #serve(): void {
    const waiter = this.#waiter;
    if (!waiter || this.#buffered.length < waiter.length) return;
    this.#waiter = undefined;
    const bytes = this.#buffered.subarray(0, waiter.length);
    this.#buffered = this.#buffered.subarray(waiter.length);
    waiter.resolve(bytes);
  }
}
