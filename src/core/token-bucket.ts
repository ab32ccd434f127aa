/**
 * A token bucket: on average at most `bytesPerSecond`, in bursts of at most one second's worth. Used to
 * stand for a slow link or a slow target in benchmarks and tests, and by admins to spare production.
 */
export class TokenBucket {
  #available: number;
  #last = performance.now();

  constructor(private readonly bytesPerSecond: number) {
    this.#available = bytesPerSecond;
  }

  /** Resolves once `bytes` may pass. */
  async take(bytes: number): Promise<void> {
    for (;;) {
      const now = performance.now();
      this.#available = Math.min(this.bytesPerSecond, this.#available + ((now - this.#last) / 1000) * this.bytesPerSecond);
      this.#last = now;
      if (this.#available >= bytes || this.#available >= this.bytesPerSecond) {
        this.#available -= bytes;
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, Math.ceil(((bytes - this.#available) / this.bytesPerSecond) * 1000)));
    }
  }
}
