import { createConnection, type Socket } from 'node:net';
import { randomInt } from 'node:crypto';
import { SnapshiftError } from '../../core/errors.ts';

/**
 * A client for the QEMU guest agent (qemu-ga), reached through the host side of its virtio-serial channel.
 * The protocol is QMP-like JSON lines without a greeting; `guest-sync-delimited` first tells our answer apart
 * from whatever a previous client left in the channel (QEMU guest agent protocol reference). One command at
 * a time.
 */
export class GuestAgent implements AsyncDisposable {
  #buffer = '';
  #waiter: { resolve: (line: string) => void; reject: (error: Error) => void } | undefined;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (bytes: Buffer) => {
      // guest-sync-delimited makes the agent send 0xff before its answer; 0xff is never part of UTF-8 text.
      this.#buffer += Buffer.from(bytes.filter((byte) => byte !== 0xff)).toString('utf8');
      this.#deliver();
    });
    socket.on('close', () => this.#waiter?.reject(new SnapshiftError('QGA_DISCONNECTED', 'the guest agent channel closed')));
  }

  static async connect(socketPath: string, timeoutMs = 5_000): Promise<GuestAgent> {
    const socket = createConnection(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (error) => reject(new SnapshiftError('QGA_CONNECT_FAILED', `cannot reach the guest agent at ${socketPath}: ${error.message}`)));
    });
    const agent = new GuestAgent(socket);
    const id = randomInt(1, 2 ** 31);
    const synced = await agent.execute<number>('guest-sync-delimited', { id }, timeoutMs);
    if (synced !== id) throw new SnapshiftError('QGA_NOT_AGENT', `${socketPath} did not answer the guest agent's sync`);
    return agent;
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    for (;;) {
      const line = await this.#nextLine(timeoutMs, command);
      let reply: { return?: T; error?: { class: string; desc: string } };
      try {
        reply = JSON.parse(line) as typeof reply;
      } catch {
        continue; // noise left in the channel before the sync
      }
      if (reply.error) throw new SnapshiftError('QGA_COMMAND_FAILED', `guest agent: ${command} failed: ${reply.error.desc}`);
      if ('return' in reply) return reply.return as T;
    }
  }

  async close(): Promise<void> {
    this.socket.end();
    this.socket.destroy();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #nextLine(timeoutMs: number, command: string): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = undefined;
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
