import type { Socket } from 'node:net';

/**
 * Exact-length reads from a socket for a request/response protocol: bytes wait here until asked for, and
 * the socket is paused while more than `highWaterBytes` wait, so a client that sends faster than we answer
 * is slowed by TCP rather than growing our memory.
 */
export class SocketByteReader {
  readonly #socket: Socket;
  readonly #highWaterBytes: number;
  #pieces: Buffer[] = [];
  #bufferedBytes = 0;
  #waiter: { length: number; resolve: (bytes: Buffer) => void; reject: (error: Error) => void } | undefined;
  #ended: Error | undefined;

  constructor(socket: Socket, highWaterBytes = 4 * 1024 * 1024) {
    this.#socket = socket;
    this.#highWaterBytes = highWaterBytes;
    socket.on('data', (bytes: Buffer) => {
      this.#pieces.push(bytes);
      this.#bufferedBytes += bytes.length;
      if (this.#bufferedBytes > this.#highWaterBytes) socket.pause();
      this.#serve();
    });
    const end = (why: string) => {
      this.#ended ??= new Error(why);
      this.#serve();
    };
    socket.on('end', () => end('the client closed the connection'));
    socket.on('close', () => end('the connection closed'));
    socket.on('error', (error) => end(`the connection failed: ${error.message}`));
  }

  /** Resolves with exactly `length` bytes, or rejects once the connection ends before they arrive. */
  read(length: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.#waiter = { length, resolve, reject };
      this.#serve();
    });
  }

  /** Reads and drops `length` bytes (a payload we refuse), never holding more than one socket read of them. */
  async skip(length: number): Promise<void> {
    let left = length;
    while (left > 0) {
      const step = Math.min(left, 1024 * 1024);
      await this.read(step);
      left -= step;
    }
  }

  #serve(): void {
    const waiter = this.#waiter;
    if (!waiter) return;
    if (this.#bufferedBytes >= waiter.length) {
      this.#waiter = undefined;
      waiter.resolve(this.#take(waiter.length));
      if (this.#bufferedBytes <= this.#highWaterBytes && this.#socket.isPaused()) this.#socket.resume();
      return;
    }
    if (this.#ended) {
      this.#waiter = undefined;
      waiter.reject(this.#ended);
      return;
    }
    // Not enough yet: the socket must flow even if a large payload exceeds the high-water mark.
    if (this.#socket.isPaused()) this.#socket.resume();
  }

  #take(length: number): Buffer {
    this.#bufferedBytes -= length;
    const first = this.#pieces[0];
    if (first && first.length >= length) {
      const bytes = first.subarray(0, length);
      if (first.length === length) this.#pieces.shift();
      else this.#pieces[0] = first.subarray(length);
      return bytes;
    }
    const out = Buffer.allocUnsafe(length);
    let at = 0;
    while (at < length) {
      const piece = this.#pieces[0]!;
      const take = Math.min(piece.length, length - at);
      piece.copy(out, at, 0, take);
      at += take;
      if (take === piece.length) this.#pieces.shift();
      else this.#pieces[0] = piece.subarray(take);
    }
    return out;
  }
}
