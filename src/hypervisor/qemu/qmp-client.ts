import { createConnection, type Socket } from 'node:net';
import { EventEmitter } from 'node:events';
import { SnapshiftError } from '../../core/errors.ts';

/** A QMP event as QEMU sends it; `data` is `{}` when QEMU sends none. */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** The QEMU version from the QMP greeting. */
export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
  /** Distribution build string, e.g. "Debian 1:7.2+dfsg-7". */
  package: string;
}

export interface QmpConnectOptions {
  /** Budget for connecting, the greeting and `qmp_capabilities` together; default 10 s. */
  timeoutMs?: number;
}

export interface QmpCommandOptions {
  /** Default 60 s; a command that outlives it rejects with QMP_TIMEOUT (QEMU may still run it). */
  timeoutMs?: number;
}

interface PendingCommand {
  command: string;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  name: string;
  predicate: (event: QmpEvent) => boolean;
  resolve: (event: QmpEvent) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const defaultConnectTimeoutMs = 10_000;
const defaultCommandTimeoutMs = 60_000;

/**
 * Our QMP client (QEMU Machine Protocol: one JSON object per line; QEMU's qapi/qmp-spec).
 * Commands carry an `id` so many may be in flight; events go to `on('event')` listeners and to
 * `waitForEvent` waiters. A waiter is armed when `waitForEvent` is called, not when it is awaited, so
 * the pattern "arm the waiter, execute the command, await the waiter" never misses a fast event.
 */
export class QmpClient extends EventEmitter implements AsyncDisposable {
  readonly #socket: Socket;
  readonly #socketPath: string;
  readonly #pending = new Map<number, PendingCommand>();
  #waiters: EventWaiter[] = [];
  #nextId = 1;
  #lineBuffer = '';
  #closed = false;
  #closeReason: string | undefined;
  #greetingHandler: ((message: Record<string, unknown> | Error) => void) | undefined;
  /** The QEMU version QEMU announced in its greeting. */
  version: QemuVersion = { major: 0, minor: 0, micro: 0, package: '' };
  /** Capabilities offered in the greeting (e.g. "oob"). */
  capabilities: string[] = [];

  private constructor(socket: Socket, socketPath: string) {
    super();
    this.#socket = socket;
    this.#socketPath = socketPath;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.#onData(chunk));
    socket.on('error', (error) => {
      this.#closeReason ??= error.message;
    });
    socket.on('close', () => this.#onClose());
  }

  /** Connects to a QMP unix socket, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? defaultConnectTimeoutMs;
    const deadline = Date.now() + timeoutMs;
    const socket = await openSocket(socketPath, timeoutMs);
    const client = new QmpClient(socket, socketPath);
    try {
      const greeting = await client.#readGreeting(deadline - Date.now());
      client.#applyGreeting(greeting);
      await client.execute('qmp_capabilities', undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
      return client;
    } catch (error) {
      client.#socket.destroy();
      if (error instanceof SnapshiftError && error.code === 'QMP_TIMEOUT') {
        throw new SnapshiftError('QMP_NOT_QEMU', `${socketPath} sent a greeting but did not answer qmp_capabilities within ${timeoutMs} ms`, { cause: error });
      }
      throw error;
    }
  }

  /** True until the socket closes. */
  get connected(): boolean {
    return !this.#closed;
  }

  /** Runs a QMP command and resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpCommandOptions = {}): Promise<T> {
    if (this.#closed) return Promise.reject(this.#disconnectedError(command));
    const id = this.#nextId++;
    const timeoutMs = options.timeoutMs ?? defaultCommandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SnapshiftError('QMP_TIMEOUT', `QMP command ${command} on ${this.#socketPath} got no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject, timer });
      const message = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.#socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  /**
   * Resolves with the first event `name` (matching `predicate`) that arrives from now on. Call it before
   * the command that causes the event and await it afterwards. A waiter that is never awaited rejects
   * silently (timeout or disconnect), so an early failure of the command needs no extra handling.
   */
  waitForEvent(name: string, predicate: (event: QmpEvent) => boolean = () => true, options: QmpCommandOptions = {}): Promise<QmpEvent> {
    if (this.#closed) return Promise.reject(this.#disconnectedError(`waiting for event ${name}`));
    const timeoutMs = options.timeoutMs ?? defaultCommandTimeoutMs;
    const arrival = new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        predicate,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#waiters = this.#waiters.filter((other) => other !== waiter);
          reject(new SnapshiftError('QMP_TIMEOUT', `QMP event ${name} did not arrive from ${this.#socketPath} within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.#waiters.push(waiter);
    });
    // Armed waiters are often awaited late or not at all (the command failed first): a rejection
    // meanwhile must not count as unhandled. Awaiting `arrival` still throws.
    arrival.catch(() => undefined);
    return arrival;
  }

  /** Closes the connection; pending commands and waiters reject with QMP_DISCONNECTED. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closeReason ??= 'closed by us';
    await new Promise<void>((resolve) => {
      this.#socket.once('close', () => resolve());
      this.#socket.end();
      // A peer that does not close its side in time is cut off.
      setTimeout(() => this.#socket.destroy(), 1_000).unref();
    });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  async #readGreeting(timeoutMs: number): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#greetingHandler = undefined;
        reject(
          new SnapshiftError(
            'QMP_NOT_QEMU',
            `${this.#socketPath} sent no QMP greeting within ${Math.max(0, timeoutMs)} ms: it is not a QEMU monitor, or another client holds it (a QMP socket serves one client at a time)`,
          ),
        );
      }, Math.max(1, timeoutMs));
      this.#greetingHandler = (message) => {
        clearTimeout(timer);
        this.#greetingHandler = undefined;
        if (message instanceof Error) reject(message);
        else resolve(message);
      };
    });
  }

  #applyGreeting(greeting: Record<string, unknown>): void {
    const qmp = greeting['QMP'] as { version?: { qemu?: Partial<QemuVersion>; package?: string }; capabilities?: unknown } | undefined;
    const qemu = qmp?.version?.qemu;
    this.version = {
      major: Number(qemu?.major ?? 0),
      minor: Number(qemu?.minor ?? 0),
      micro: Number(qemu?.micro ?? 0),
      package: String(qmp?.version?.package ?? '').trim(),
    };
    this.capabilities = Array.isArray(qmp?.capabilities) ? qmp.capabilities.map(String) : [];
  }

  #onData(chunk: string): void {
    this.#lineBuffer += chunk;
    let newline: number;
    while ((newline = this.#lineBuffer.indexOf('\n')) >= 0) {
      const line = this.#lineBuffer.slice(0, newline).trim();
      this.#lineBuffer = this.#lineBuffer.slice(newline + 1);
      if (line !== '') this.#onLine(line);
    }
    // A peer that is not QEMU may stream bytes without newlines; do not grow without bound.
    if (this.#greetingHandler && this.#lineBuffer.length > 64 * 1024) this.#notQemu(`${this.#lineBuffer.slice(0, 40)}…`);
  }

  #onLine(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      if (this.#greetingHandler) return this.#notQemu(line);
      this.emit('protocolError', new SnapshiftError('QMP_PROTOCOL_ERROR', `${this.#socketPath} sent a line that is not JSON: ${line.slice(0, 80)}`));
      return;
    }
    if (typeof message !== 'object' || message === null) return;
    const record = message as Record<string, unknown>;
    if (this.#greetingHandler) {
      if (typeof record['QMP'] === 'object' && record['QMP'] !== null) return this.#greetingHandler(record);
      return this.#notQemu(line);
    }
    if (typeof record['event'] === 'string') return this.#onEvent(record);
    if (typeof record['id'] === 'number') this.#onReply(record['id'], record);
  }

  #notQemu(firstLine: string): void {
    this.#greetingHandler?.(new SnapshiftError('QMP_NOT_QEMU', `${this.#socketPath} does not speak QMP: it sent "${firstLine.slice(0, 80)}" instead of a QMP greeting`));
  }

  #onReply(id: number, reply: Record<string, unknown>): void {
    const pending = this.#pending.get(id);
    if (!pending) return;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    const error = reply['error'] as { class?: string; desc?: string } | undefined;
    if (error) {
      const failure = new SnapshiftError('QMP_COMMAND_FAILED', `QMP command ${pending.command} failed: ${error.class ?? 'Error'}: ${error.desc ?? 'no description'}`);
      Object.assign(failure, { qmpClass: error.class, qmpDesc: error.desc });
      pending.reject(failure);
    } else {
      pending.resolve(reply['return']);
    }
  }

  #onEvent(record: Record<string, unknown>): void {
    const event: QmpEvent = {
      event: record['event'] as string,
      data: (record['data'] as Record<string, unknown> | undefined) ?? {},
      ...(record['timestamp'] ? { timestamp: record['timestamp'] as QmpEvent['timestamp'] & object } : {}),
    };
    for (const waiter of [...this.#waiters]) {
      let matches = false;
      try {
        matches = waiter.name === event.event && waiter.predicate(event);
      } catch (error) {
        this.#waiters = this.#waiters.filter((other) => other !== waiter);
        clearTimeout(waiter.timer);
        waiter.reject(error instanceof Error ? error : new Error(String(error)));
        continue;
      }
      if (!matches) continue;
      this.#waiters = this.#waiters.filter((other) => other !== waiter);
      clearTimeout(waiter.timer);
      waiter.resolve(event);
    }
    this.emit('event', event);
  }

  #onClose(): void {
    this.#closed = true;
    this.#greetingHandler?.(new SnapshiftError('QMP_NOT_QEMU', `${this.#socketPath} closed the connection before sending a QMP greeting (not a QEMU monitor, or QEMU is exiting)`));
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(this.#disconnectedError(pending.command));
    }
    this.#pending.clear();
    for (const waiter of this.#waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(this.#disconnectedError(`waiting for event ${waiter.name}`));
    }
    this.#waiters = [];
    this.emit('close');
  }

  #disconnectedError(what: string): SnapshiftError {
    return new SnapshiftError('QMP_DISCONNECTED', `QMP connection to ${this.#socketPath} closed (${this.#closeReason ?? 'by QEMU'}) during ${what}`);
  }
}

/** A QMP error reply's class and description, when `error` came from one. */
export function qmpErrorClass(error: unknown): string | undefined {
  return error instanceof SnapshiftError && error.code === 'QMP_COMMAND_FAILED' ? (error as SnapshiftError & { qmpClass?: string }).qmpClass : undefined;
}

function openSocket(socketPath: string, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new SnapshiftError('QMP_CONNECT_FAILED', `could not connect to QMP socket ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const why =
        error.code === 'ENOENT' ? 'no such socket (is QEMU running?)' : error.code === 'ECONNREFUSED' ? 'connection refused (nobody listens there; QEMU exited?)' : error.message;
      reject(new SnapshiftError('QMP_CONNECT_FAILED', `cannot connect to QMP socket ${socketPath}: ${why}`, { cause: error }));
    });
  });
}
