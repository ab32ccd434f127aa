import type { Socket } from 'node:net';
import { messageOf } from '../../core/errors.ts';
import type { ExportExtent, ExportPiece, NbdExportSource } from './nbd-export-source.ts';
import {
  allocationFlag,
  chunkType,
  command,
  commandFlag,
  handshakeFlag,
  info,
  nbdErrno,
  nbdMagic,
  option,
  optionErrorInvalid,
  optionErrorUnknownExport,
  optionErrorUnsupported,
  optionMagic,
  optionReply,
  optionReplyMagic,
  replyFlagDone,
  requestHeaderBytes,
  requestMagic,
  simpleReplyMagic,
  structuredReplyMagic,
  transmissionFlag,
} from './nbd-protocol.ts';
import { SocketByteReader } from './socket-byte-reader.ts';

/** The one meta context we serve (NBD spec: "Metadata querying", base:allocation). */
export const baseAllocation = 'base:allocation';
const baseAllocationId = 1;

/** NBD spec, "Size constraints": we accept any alignment and at most 32 MiB per request. */
export const maxPayloadBytes = 32 * 1024 * 1024;
/** Option payloads beyond this end the connection: no legitimate option comes near it. */
const maxOptionBytes = 64 * 1024;
/** BLOCK_STATUS answers cover at most this much; a client asks again for the rest (the spec allows less). */
const maxBlockStatusBytes = 2 ** 32 - 4096;
const zeros = Buffer.alloc(1024 * 1024);

export interface ConnectionLimits {
  /** Requests of one connection being answered at once; more wait in the socket. */
  maxRequestsInFlight: number;
  /** Reply bytes queued on the socket before we stop taking requests until it drains. */
  maxQueuedReplyBytes: number;
}

export interface ConnectionEvents {
  /** A request failed in the export source (the client got an error reply); for the server's log. */
  onRequestError?: (message: string) => void;
  /** Every READ answered: bytes sent as data, bytes sent as holes. */
  onRead?: (dataBytes: number, holeBytes: number) => void;
}

/** Why the handshake or transmission loop ends the connection without another word. */
class HardDisconnect extends Error {}

/**
 * One client of our NBD server, from greeting to disconnect: fixed newstyle negotiation, then the
 * transmission phase with many requests in flight, answered out of order, each reply written to the
 * socket in one synchronous run so chunks of different replies never interleave inside a chunk.
 */
export class NbdServerConnection {
  readonly #socket: Socket;
  readonly #reader: SocketByteReader;
  readonly #exports: readonly NbdExportSource[];
  readonly #limits: ConnectionLimits;
  readonly #events: ConnectionEvents;
  readonly #abort = new AbortController();
  #noZeroes = false;
  #structured = false;
  /** Meta contexts selected by the last NBD_OPT_SET_META_CONTEXT, and for which export. */
  #metaExport: NbdExportSource | undefined;
  #metaSelected = false;
  #inFlight = 0;
  #slotFreed: (() => void) | undefined;
  readonly finished: Promise<void>;

  constructor(socket: Socket, exports: readonly NbdExportSource[], limits: ConnectionLimits, events: ConnectionEvents) {
    this.#socket = socket;
    this.#exports = exports;
    this.#limits = limits;
    this.#events = events;
    this.#reader = new SocketByteReader(socket);
    socket.setNoDelay(true);
    socket.on('close', () => this.#abort.abort(new Error('the client connection closed')));
    socket.on('error', () => undefined); // 'close' follows; a dropped client is not our failure
    this.finished = this.#run();
  }

  /** Ends the connection at once; requests in flight are abandoned (their source reads see the abort). */
  destroy(): void {
    this.#abort.abort(new Error('the NBD server is closing'));
    this.#socket.destroy();
  }

  async #run(): Promise<void> {
    try {
      const source = await this.#negotiate();
      if (!source) return;
      await this.#transmit(source);
    } catch (error) {
      if (!(error instanceof HardDisconnect) && !this.#socket.destroyed && !this.#abort.signal.aborted) this.#events.onRequestError?.(`NBD connection dropped: ${messageOf(error)}`);
    } finally {
      while (this.#inFlight > 0 && !this.#socket.destroyed) await new Promise<void>((resolve) => (this.#slotFreed = resolve));
      if (!this.#socket.destroyed) this.#socket.end();
      this.#socket.destroy();
    }
  }

  // ---- Negotiation (NBD spec: "Fixed newstyle negotiation", "Option types")

  async #negotiate(): Promise<NbdExportSource | undefined> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(nbdMagic, 0);
    greeting.writeBigUInt64BE(optionMagic, 8);
    greeting.writeUInt16BE(handshakeFlag.fixedNewstyle | handshakeFlag.noZeroes, 16);
    this.#socket.write(greeting);
    const clientFlags = (await this.#read(4)).readUInt32BE(0);
    // Unknown client flags, or a client that cannot do fixed newstyle: the spec says to close.
    if ((clientFlags & ~(handshakeFlag.fixedNewstyle | handshakeFlag.noZeroes)) !== 0 || (clientFlags & handshakeFlag.fixedNewstyle) === 0) throw new HardDisconnect();
    this.#noZeroes = (clientFlags & handshakeFlag.noZeroes) !== 0;
    for (;;) {
      const header = await this.#read(16);
      if (header.readBigUInt64BE(0) !== optionMagic) throw new HardDisconnect();
      const optionType = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > maxOptionBytes) throw new HardDisconnect();
      const data = length > 0 ? await this.#read(length) : Buffer.alloc(0);
      switch (optionType) {
        case option.exportName: {
          const source = this.#find(data.toString('utf8'));
          if (!source) throw new HardDisconnect(); // the only answer NBD_OPT_EXPORT_NAME allows
          const reply = Buffer.alloc(this.#noZeroes ? 10 : 134);
          reply.writeBigUInt64BE(BigInt(source.sizeBytes), 0);
          reply.writeUInt16BE(this.#transmissionFlags(), 8);
          this.#socket.write(reply);
          if (this.#metaExport !== source) this.#metaSelected = false;
          return source;
        }
        case option.abort:
          this.#optionReply(optionType, optionReply.ack);
          return undefined;
        case option.list:
          if (length !== 0) {
            this.#optionReply(optionType, optionErrorInvalid, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const source of this.#exports) {
            const name = Buffer.from(source.name, 'utf8');
            this.#optionReply(optionType, optionReply.server, Buffer.concat([u32(name.length), name, Buffer.from(source.description ?? '', 'utf8')]));
          }
          this.#optionReply(optionType, optionReply.ack);
          break;
        case option.info:
        case option.go: {
          const source = this.#infoOrGo(optionType, data);
          if (source && optionType === option.go) {
            if (this.#metaExport !== source) this.#metaSelected = false;
            return source;
          }
          break;
        }
        case option.structuredReply:
          if (length !== 0) this.#optionReply(optionType, optionErrorInvalid, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          else {
            this.#structured = true;
            this.#optionReply(optionType, optionReply.ack);
          }
          break;
        case option.listMetaContext:
        case option.setMetaContext:
          this.#metaContext(optionType, data);
          break;
        default:
          this.#optionReply(optionType, optionErrorUnsupported, `option ${optionType} is not supported by this server`);
      }
    }
  }

  #infoOrGo(optionType: number, data: Buffer): NbdExportSource | undefined {
    const request = parseInfoRequest(data);
    if (!request) {
      this.#optionReply(optionType, optionErrorInvalid, 'malformed NBD_OPT_INFO/GO data');
      return undefined;
    }
    const source = this.#find(request.name);
    if (!source) {
      this.#optionReply(optionType, optionErrorUnknownExport, `no export named "${request.name}" (exports: ${this.#exports.map((e) => e.name).join(', ')})`);
      return undefined;
    }
    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(info.export, 0);
    exportInfo.writeBigUInt64BE(BigInt(source.sizeBytes), 2);
    exportInfo.writeUInt16BE(this.#transmissionFlags(), 10);
    this.#optionReply(optionType, optionReply.info, exportInfo);
    if (request.infoTypes.includes(info.name)) this.#optionReply(optionType, optionReply.info, Buffer.concat([u16(info.name), Buffer.from(source.name, 'utf8')]));
    if (request.infoTypes.includes(info.description) && source.description) {
      this.#optionReply(optionType, optionReply.info, Buffer.concat([u16(info.description), Buffer.from(source.description, 'utf8')]));
    }
    // Always sent: our constraints are the spec's defaults except the preferred size, which is only a hint.
    const blockSize = Buffer.alloc(14);
    blockSize.writeUInt16BE(info.blockSize, 0);
    blockSize.writeUInt32BE(1, 2);
    blockSize.writeUInt32BE(Math.min(source.preferredBlockBytes ?? 4096, maxPayloadBytes), 6);
    blockSize.writeUInt32BE(maxPayloadBytes, 10);
    this.#optionReply(optionType, optionReply.info, blockSize);
    this.#optionReply(optionType, optionReply.ack);
    return source;
  }

  /** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT; we know one context, base:allocation. */
  #metaContext(optionType: number, data: Buffer): void {
    const isSet = optionType === option.setMetaContext;
    if (isSet) this.#metaSelected = false; // "replaces all previously-set metadata contexts (including when this command fails)"
    if (!this.#structured) return this.#optionReply(optionType, optionErrorInvalid, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
    const request = parseMetaContextRequest(data);
    if (!request) return this.#optionReply(optionType, optionErrorInvalid, 'malformed meta context request');
    const source = this.#find(request.name);
    if (!source) return this.#optionReply(optionType, optionErrorUnknownExport, `no export named "${request.name}"`);
    const matches = request.queries.length === 0 ? !isSet : request.queries.some((query) => query === baseAllocation || (!isSet && query === 'base:'));
    if (matches) {
      const name = Buffer.from(baseAllocation, 'utf8');
      this.#optionReply(optionType, optionReply.metaContext, Buffer.concat([u32(isSet ? baseAllocationId : 0), name]));
    }
    if (isSet) {
      this.#metaSelected = matches;
      this.#metaExport = source;
    }
    this.#optionReply(optionType, optionReply.ack);
  }

  #transmissionFlags(): number {
    let flags = transmissionFlag.hasFlags | transmissionFlag.readOnly | transmissionFlag.canMultiConn | transmissionFlag.sendFlush;
    if (this.#structured) flags |= transmissionFlag.sendDf;
    return flags;
  }

  #find(name: string): NbdExportSource | undefined {
    return this.#exports.find((source) => source.name === name) ?? (name === '' ? this.#exports[0] : undefined);
  }

  #optionReply(optionType: number, replyType: number, data: Buffer | string = Buffer.alloc(0)): void {
    const payload = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    const header = Buffer.alloc(20);
    header.writeBigUInt64BE(optionReplyMagic, 0);
    header.writeUInt32BE(optionType, 8);
    header.writeUInt32BE(replyType, 12);
    header.writeUInt32BE(payload.length, 16);
    this.#socket.write(payload.length > 0 ? Buffer.concat([header, payload]) : header);
  }

  // ---- Transmission (NBD spec: "Transmission phase", "Request types")

  async #transmit(source: NbdExportSource): Promise<void> {
    for (;;) {
      // Backpressure: a bounded number of requests in work and of reply bytes waiting on the socket.
      while (this.#inFlight >= this.#limits.maxRequestsInFlight) await new Promise<void>((resolve) => (this.#slotFreed = resolve));
      if (this.#socket.writableLength > this.#limits.maxQueuedReplyBytes) await this.#drained();
      const header = await this.#read(requestHeaderBytes);
      if (header.readUInt32BE(0) !== requestMagic) throw new HardDisconnect();
      const flags = header.readUInt16BE(4);
      const type = header.readUInt16BE(6);
      const cookie = Buffer.from(header.subarray(8, 16));
      const offsetBig = header.readBigUInt64BE(16);
      const length = header.readUInt32BE(24);
      const offset = offsetBig > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offsetBig);
      switch (type) {
        case command.disconnect:
          return;
        case command.write:
          // The payload follows the header whatever our answer: read it to stay in step with the client.
          if (length > maxPayloadBytes) throw new HardDisconnect();
          await this.#reader.skip(length);
          this.#simpleError(cookie, nbdErrno.eperm);
          break;
        case command.trim:
        case command.writeZeroes:
          this.#simpleError(cookie, nbdErrno.eperm);
          break;
        case command.flush:
          this.#simpleReply(cookie, 0);
          break;
        case command.read:
          this.#start(() => this.#answerRead(source, cookie, flags, offset, length));
          break;
        case command.blockStatus:
          this.#start(() => this.#answerBlockStatus(source, cookie, flags, offset, length));
          break;
        default:
          this.#simpleError(cookie, nbdErrno.einval);
      }
    }
  }

  #start(answer: () => Promise<void>): void {
    this.#inFlight++;
    void answer()
      .catch((error: unknown) => {
        if (!this.#abort.signal.aborted) this.#events.onRequestError?.(messageOf(error));
      })
      .finally(() => {
        this.#inFlight--;
        const wake = this.#slotFreed;
        this.#slotFreed = undefined;
        wake?.();
      });
  }

  async #answerRead(source: NbdExportSource, cookie: Buffer, flags: number, offset: number, length: number): Promise<void> {
    if (length > maxPayloadBytes) return this.#error(cookie, nbdErrno.einval, `read of ${length} bytes is over the ${maxPayloadBytes}-byte maximum payload`);
    if (offset + length > source.sizeBytes) return this.#error(cookie, nbdErrno.einval, `read ${offset}+${length} is beyond the ${source.sizeBytes}-byte export`);
    let pieces: ExportPiece[];
    try {
      pieces = length === 0 ? [] : await source.read(offset, length, this.#abort.signal);
    } catch (error) {
      if (this.#abort.signal.aborted) return;
      this.#error(cookie, nbdErrno.eio, messageOf(error));
      throw error;
    }
    if (this.#socket.destroyed) return;
    let dataBytes = 0;
    for (const piece of pieces) if (piece.data) dataBytes += piece.lengthBytes;
    this.#events.onRead?.(dataBytes, length - dataBytes);
    const socket = this.#socket;
    socket.cork();
    try {
      if (!this.#structured) {
        socket.write(simpleHeader(cookie, 0));
        writePieces(socket, pieces);
      } else if ((flags & commandFlag.df) !== 0 || pieces.length === 0) {
        // NBD_CMD_FLAG_DF: one data chunk, holes written out as zeros.
        const header = structuredHeader(cookie, replyFlagDone, chunkType.offsetData, 8 + length);
        socket.write(Buffer.concat([header, u64(offset)]));
        writePieces(socket, pieces);
      } else {
        let at = offset;
        for (let i = 0; i < pieces.length; i++) {
          const piece = pieces[i]!;
          const done = i === pieces.length - 1 ? replyFlagDone : 0;
          if (piece.data) {
            socket.write(Buffer.concat([structuredHeader(cookie, done, chunkType.offsetData, 8 + piece.lengthBytes), u64(at)]));
            socket.write(piece.data);
          } else {
            socket.write(Buffer.concat([structuredHeader(cookie, done, chunkType.offsetHole, 12), u64(at), u32(piece.lengthBytes)]));
          }
          at += piece.lengthBytes;
        }
      }
    } finally {
      socket.uncork();
    }
  }

  async #answerBlockStatus(source: NbdExportSource, cookie: Buffer, flags: number, offset: number, length: number): Promise<void> {
    if (!this.#structured || !this.#metaSelected) return this.#error(cookie, nbdErrno.einval, 'no meta context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)');
    if (length === 0 || offset + length > source.sizeBytes) return this.#error(cookie, nbdErrno.einval, `block status ${offset}+${length} is empty or beyond the ${source.sizeBytes}-byte export`);
    let extents: ExportExtent[];
    try {
      extents = await source.extents(offset, Math.min(length, maxBlockStatusBytes), this.#abort.signal);
    } catch (error) {
      if (this.#abort.signal.aborted) return;
      this.#error(cookie, nbdErrno.eio, messageOf(error));
      throw error;
    }
    if (this.#socket.destroyed) return;
    // Merge equal neighbours, clip to the request, and with NBD_CMD_FLAG_REQ_ONE keep only the first.
    const descriptors: Array<{ length: number; flags: number }> = [];
    let covered = 0;
    for (const extent of extents) {
      const take = Math.min(extent.lengthBytes, length - covered);
      if (take <= 0) break;
      const status = extent.zero ? allocationFlag.hole | allocationFlag.zero : 0;
      const last = descriptors.at(-1);
      if (last && last.flags === status) last.length += take;
      else descriptors.push({ length: take, flags: status });
      covered += take;
    }
    if (descriptors.length === 0) return this.#error(cookie, nbdErrno.eio, `the export source gave no extents at ${offset}`);
    const kept = (flags & commandFlag.reqOne) !== 0 ? descriptors.slice(0, 1) : descriptors;
    const payload = Buffer.allocUnsafe(4 + kept.length * 8);
    payload.writeUInt32BE(baseAllocationId, 0);
    kept.forEach((descriptor, i) => {
      payload.writeUInt32BE(descriptor.length, 4 + i * 8);
      payload.writeUInt32BE(descriptor.flags, 8 + i * 8);
    });
    this.#socket.write(Buffer.concat([structuredHeader(cookie, replyFlagDone, chunkType.blockStatus, payload.length), payload]));
  }

  /** An error reply: a structured error chunk where structured replies were negotiated, else a simple one. */
  #error(cookie: Buffer, errno: number, message: string): void {
    if (this.#socket.destroyed) return;
    if (!this.#structured) return this.#simpleError(cookie, errno);
    const text = Buffer.from(message.slice(0, 4096), 'utf8');
    const payload = Buffer.concat([u32(errno), u16(text.length), text]);
    this.#socket.write(Buffer.concat([structuredHeader(cookie, replyFlagDone, chunkType.error, payload.length), payload]));
  }

  #simpleError(cookie: Buffer, errno: number): void {
    this.#simpleReply(cookie, errno);
  }

  #simpleReply(cookie: Buffer, errno: number): void {
    if (!this.#socket.destroyed) this.#socket.write(simpleHeader(cookie, errno));
  }

  async #read(length: number): Promise<Buffer> {
    try {
      return await this.#reader.read(length);
    } catch {
      throw new HardDisconnect(); // the client went away; nothing to answer
    }
  }

  #drained(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.#socket.off('drain', done);
        this.#socket.off('close', done);
        resolve();
      };
      this.#socket.on('drain', done);
      this.#socket.on('close', done);
    });
  }
}

function writePieces(socket: Socket, pieces: readonly ExportPiece[]): void {
  for (const piece of pieces) {
    if (piece.data) {
      socket.write(piece.data);
      continue;
    }
    for (let left = piece.lengthBytes; left > 0; left -= zeros.length) socket.write(left >= zeros.length ? zeros : zeros.subarray(0, left));
  }
}

function parseInfoRequest(data: Buffer): { name: string; infoTypes: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (4 + nameLength + 2 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 4 + nameLength + 2 + count * 2) return undefined;
  const infoTypes: number[] = [];
  for (let i = 0; i < count; i++) infoTypes.push(data.readUInt16BE(6 + nameLength + i * 2));
  return { name, infoTypes };
}

function parseMetaContextRequest(data: Buffer): { name: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (4 + nameLength + 4 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt32BE(4 + nameLength);
  const queries: string[] = [];
  let at = 8 + nameLength;
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const queryLength = data.readUInt32BE(at);
    if (at + 4 + queryLength > data.length) return undefined;
    queries.push(data.toString('utf8', at + 4, at + 4 + queryLength));
    at += 4 + queryLength;
  }
  return at === data.length ? { name, queries } : undefined;
}

function simpleHeader(cookie: Buffer, errno: number): Buffer {
  const header = Buffer.allocUnsafe(16);
  header.writeUInt32BE(simpleReplyMagic, 0);
  header.writeUInt32BE(errno, 4);
  cookie.copy(header, 8);
  return header;
}

function structuredHeader(cookie: Buffer, flags: number, type: number, length: number): Buffer {
  const header = Buffer.allocUnsafe(20);
  header.writeUInt32BE(structuredReplyMagic, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  cookie.copy(header, 8);
  header.writeUInt32BE(length, 16);
  return header;
}

function u64(value: number): Buffer {
  const bytes = Buffer.allocUnsafe(8);
  bytes.writeBigUInt64BE(BigInt(value));
  return bytes;
}

function u32(value: number): Buffer {
  const bytes = Buffer.allocUnsafe(4);
  bytes.writeUInt32BE(value);
  return bytes;
}

function u16(value: number): Buffer {
  const bytes = Buffer.allocUnsafe(2);
  bytes.writeUInt16BE(value);
  return bytes;
}
