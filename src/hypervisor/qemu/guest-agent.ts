import { createConnection, type Socket } from 'node:net';
import { randomInt } from 'node:crypto';
import { SnapshiftError } from '../../core/errors.ts';

type AgentReply = { return?: unknown; error?: { class: string; desc: string } };

/**
 * A client for the QEMU guest agent (qemu-ga), reached through the host side of its virtio-serial channel.
 * The protocol is QMP-like JSON lines without a greeting; `guest-sync-delimited` first tells our answer apart
 * from whatever a previous client left in the channel (QEMU guest agent protocol reference). One command at
 * a time. After a command timed out, its answer may still come: the next command syncs again first, so it
 * never takes that answer for its own.
 */
export class GuestAgent implements AsyncDisposable {
  #buffer = '';
  #waiter: { resolve: (line: string) => void; reject: (error: Error) => void } | undefined;
  /** Set once the channel closed: every later command fails with it at once. */
  #closed: SnapshiftError | undefined;
  #unsynced = false;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (bytes: Buffer) => {
      // guest-sync-delimited makes the agent send 0xff before its answer; 0xff is never part of UTF-8 text.
      this.#buffer += Buffer.from(bytes.filter((byte) => byte !== 0xff)).toString('utf8');
      this.#deliver();
    });
    // A socket error (EPIPE, ECONNRESET) is always followed by 'close'; unlistened, it would crash the process.
    let socketError: Error | undefined;
    socket.on('error', (error) => (socketError = error));
    socket.on('close', () => {
      this.#closed = new SnapshiftError('QGA_DISCONNECTED', `the guest agent channel closed${socketError ? ` (${socketError.message})` : ''}`);
      const waiter = this.#waiter;
      this.#waiter = undefined;
      waiter?.reject(this.#closed);
    });
  }

  static async connect(socketPath: string, timeoutMs = 5_000): Promise<GuestAgent> {
    const socket = createConnection(socketPath);
    await new Promise<void>((resolve, reject) => {
      const onError = (error: Error) => reject(new SnapshiftError('QGA_CONNECT_FAILED', `cannot reach the guest agent at ${socketPath}: ${error.message}`));
      socket.once('error', onError);
      socket.once('connect', () => {
        socket.off('error', onError);
        resolve();
      });
    });
    const agent = new GuestAgent(socket);
    try {
      await agent.#sync(timeoutMs, socketPath);
    } catch (error) {
      await agent.close();
      const closed = agent.#closed;
      if (closed !== undefined && error === closed) throw new SnapshiftError('QGA_DISCONNECTED', `${closed.message} before it answered the sync of a new connection (${socketPath})`, { cause: error });
      throw error;
    }
    return agent;
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    try {
      if (this.#unsynced) await this.#sync(timeoutMs, 'the guest agent channel');
      this.#send(args ? { execute: command, arguments: args } : { execute: command });
      for (;;) {
        const reply = await this.#nextReply(timeoutMs, command);
        if (reply.error) throw new SnapshiftError('QGA_COMMAND_FAILED', `guest agent: ${command} failed: ${reply.error.desc}`);
        if ('return' in reply) return reply.return as T;
      }
    } catch (error) {
      // Raised in the socket's 'close' handler, with no caller in its stack: rethrown here, naming the command.
      const closed = this.#closed;
      if (closed !== undefined && error === closed) throw new SnapshiftError('QGA_DISCONNECTED', `${closed.message} before it answered ${command}`, { cause: error });
      throw error;
    }
  }

  async close(): Promise<void> {
    this.socket.end();
    this.socket.destroy();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** guest-sync-delimited with a fresh id; answers that came before ours (of timed-out commands) are dropped. */
  async #sync(timeoutMs: number, where: string): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    const deadline = performance.now() + timeoutMs;
    this.#send({ execute: 'guest-sync-delimited', arguments: { id } });
    for (;;) {
      const reply = await this.#nextReply(Math.max(1, deadline - performance.now()), 'guest-sync-delimited');
      if (reply.error) throw new SnapshiftError('QGA_NOT_AGENT', `${where} did not answer the guest agent's sync (${reply.error.desc})`);
      if (reply.return === id) break;
    }
    this.#unsynced = false;
  }

  #send(request: Record<string, unknown>): void {
    if (this.#closed) throw this.#closed;
    this.socket.write(`${JSON.stringify(request)}\n`);
  }

  /** The next JSON answer; lines that are not JSON (noise left in the channel before a sync) are skipped. */
  async #nextReply(timeoutMs: number, command: string): Promise<AgentReply> {
    for (;;) {
      const line = await this.#nextLine(timeoutMs, command);
      try {
        return JSON.parse(line) as AgentReply;
      } catch {
        continue;
      }
    }
  }

  #nextLine(timeoutMs: number, command: string): Promise<string> {
    if (this.#closed) return Promise.reject(this.#closed);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = undefined;
        this.#unsynced = true;
        reject(new SnapshiftError('QGA_TIMEOUT', `the guest agent did not answer ${command} within ${timeoutMs} ms (is qemu-ga running in the guest?)`));
      }, timeoutMs);
      this.#waiter = {
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      this.#deliver();
    });
  }

  #deliver(): void {
    const newline = this.#buffer.indexOf('\n');
    if (newline < 0 || !this.#waiter) return;
    const line = this.#buffer.slice(0, newline).trim();
    this.#buffer = this.#buffer.slice(newline + 1);
    const waiter = this.#waiter;
    this.#waiter = undefined;
    if (line === '') {
      this.#waiter = waiter;
      this.#deliver();
      return;
    }
    waiter.resolve(line);
  }
}

/** Freeze/thaw of the guest's file systems around the VM snapshot, through the guest agent. */
export function guestAgentQuiesce(agent: GuestAgent): { freeze(): Promise<void>; thaw(): Promise<void> } {
  return {
    freeze: async () => {
      await agent.execute<number>('guest-fsfreeze-freeze', undefined, 60_000);
    },
    thaw: async () => {
      await agent.execute<number>('guest-fsfreeze-thaw', undefined, 60_000);
    },
  };
}
