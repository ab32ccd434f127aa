import { createConnection, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { lstat, rm } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import type { NbdExportSource } from './nbd-export-source.ts';
import { NbdServerConnection, type ConnectionEvents } from './nbd-server-connection.ts';

export interface NbdServerOptions {
  /** What is served; the first is also the default export (name ""). Names must differ. */
  exports: readonly NbdExportSource[];
  /** Listen on this unix socket (created; a stale socket file there is replaced). */
  socketPath?: string;
  /** Listen on TCP too (port 0 picks a free one; see `tcpAddress`). */
  tcp?: { host: string; port: number };
  /** Requests one connection has in work at once (default 16). */
  maxRequestsInFlight?: number;
  /** Connections served at once; more are refused by closing them (default 64). */
  maxConnections?: number;
  /** Hears what goes wrong for a client without stopping the server (a damaged chunk, a client gone mid-read). */
  onError?: (message: string) => void;
}

export interface NbdServerStats {
  connectionsAccepted: number;
  readRequests: number;
  dataBytesSent: number;
  holeBytesSent: number;
}

/**
 * Our NBD server (NetworkBlockDevice/nbd doc/proto.md): read-only exports over fixed newstyle negotiation,
 * structured replies (data and hole chunks), `base:allocation` block status, many clients, each with many
 * requests in flight. It serves any `NbdExportSource`. Disposing it stops listening and ends every
 * connection.
 */
export class NbdServer implements AsyncDisposable {
  readonly #listeners: Server[] = [];
  readonly #connections = new Set<NbdServerConnection>();
  readonly #options: NbdServerOptions;
  readonly stats: NbdServerStats = { connectionsAccepted: 0, readRequests: 0, dataBytesSent: 0, holeBytesSent: 0 };
  #tcpAddress: { host: string; port: number } | undefined;
  #closing: Promise<void> | undefined;
  /** The socket file is ours to remove only once we listened on it. */
  #ownsSocketFile = false;

  private constructor(options: NbdServerOptions) {
    this.#options = options;
  }

  /** Starts listening; resolves once every asked address accepts connections. */
  static async listen(options: NbdServerOptions): Promise<NbdServer> {
    if (options.exports.length === 0) throw new SnapshiftError('BAD_ARGUMENT', 'an NBD server needs at least one export');
    const names = options.exports.map((source) => source.name);
    if (new Set(names).size !== names.length) throw new SnapshiftError('BAD_ARGUMENT', `NBD export names must differ (got ${names.join(', ')})`);
    if (!options.socketPath && !options.tcp) throw new SnapshiftError('BAD_ARGUMENT', 'an NBD server needs a unix socket path or a TCP address');
    const server = new NbdServer(options);
    try {
      if (options.socketPath) {
        await removeStaleSocket(options.socketPath);
        await server.#listen((listener) => listener.listen(options.socketPath), `unix socket ${options.socketPath}`);
        server.#ownsSocketFile = true;
      }
      if (options.tcp) {
        const listener = await server.#listen((l) => l.listen(options.tcp!.port, options.tcp!.host), `TCP ${options.tcp.host}:${options.tcp.port}`);
        const address = listener.address() as AddressInfo;
        server.#tcpAddress = { host: address.address, port: address.port };
      }
    } catch (error) {
      await server.close();
      throw error;
    }
    return server;
  }

  get socketPath(): string | undefined {
    return this.#options.socketPath;
  }

  /** Where TCP clients connect (the port chosen when asked for port 0). */
  get tcpAddress(): { host: string; port: number } | undefined {
    return this.#tcpAddress;
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  /** `nbd+unix:///NAME?socket=PATH` for the export `name` (QEMU and libnbd understand it). */
  uriOf(name: string): string {
    if (!this.#options.socketPath) throw new SnapshiftError('BAD_ARGUMENT', 'this NBD server has no unix socket');
    return `nbd+unix:///${encodeURIComponent(name)}?socket=${encodeURI(this.#options.socketPath)}`;
  }

  /** Stops listening and ends every connection (requests in flight are abandoned). */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  async #close(): Promise<void> {
    const closed = this.#listeners.map((listener) => new Promise<void>((resolve) => listener.close(() => resolve())));
    for (const connection of this.#connections) connection.destroy();
    await Promise.all([...closed, ...[...this.#connections].map((connection) => connection.finished)]);
    if (this.#options.socketPath && this.#ownsSocketFile) await rm(this.#options.socketPath, { force: true });
  }

  #listen(start: (listener: Server) => void, where: string): Promise<Server> {
    const listener = createServer({ noDelay: true }, (socket) => this.#accept(socket));
    this.#listeners.push(listener);
    return new Promise((resolve, reject) => {
      listener.once('error', (error: NodeJS.ErrnoException) => {
        reject(new SnapshiftError('NBD_SERVER_LISTEN_FAILED', `NBD server cannot listen on ${where}: ${error.code === 'EADDRINUSE' ? 'address in use' : error.message}`, { cause: error }));
      });
      listener.once('listening', () => {
        listener.on('error', (error) => this.#options.onError?.(`NBD server on ${where}: ${error.message}`));
        resolve(listener);
      });
      start(listener);
    });
  }

  #accept(socket: Socket): void {
    if (this.#closing || this.#connections.size >= (this.#options.maxConnections ?? 64)) {
      socket.destroy();
      return;
    }
    this.stats.connectionsAccepted++;
    const events: ConnectionEvents = {
      onRequestError: (message) => this.#options.onError?.(message),
      onRead: (dataBytes, holeBytes) => {
        this.stats.readRequests++;
        this.stats.dataBytesSent += dataBytes;
        this.stats.holeBytesSent += holeBytes;
      },
    };
    const connection = new NbdServerConnection(
      socket,
      this.#options.exports,
      { maxRequestsInFlight: this.#options.maxRequestsInFlight ?? 16, maxQueuedReplyBytes: 16 * 1024 * 1024 },
      events,
    );
    this.#connections.add(connection);
    void connection.finished
      .catch((error: unknown) => this.#options.onError?.(`NBD connection failed: ${messageOf(error)}`))
      .finally(() => this.#connections.delete(connection));
  }
}

/** A socket file nobody listens on (a killed server's) is removed; a live one or any other file is not ours to take. */
async function removeStaleSocket(path: string): Promise<void> {
  const info = await lstat(path).catch(() => undefined);
  if (!info) return;
  if (!info.isSocket()) throw new SnapshiftError('NBD_SERVER_LISTEN_FAILED', `cannot serve NBD on ${path}: a file that is not a socket is there`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = createConnection({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new SnapshiftError('NBD_SERVER_LISTEN_FAILED', `cannot serve NBD on ${path}: another server listens there`);
  await rm(path, { force: true });
}
