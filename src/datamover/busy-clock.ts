/**
 * Measures how long a pipeline stage was busy: the union of the intervals in which at least one of its
 * operations was in flight. Overlapping operations count once, so the figure compares with wall time.
 */
export class BusyClock {
  #inFlight = 0;
  #since = 0;
  #busyMs = 0;

  begin(): void {
    if (this.#inFlight++ === 0) this.#since = performance.now();
  }

  end(): void {
    if (--this.#inFlight === 0) this.#busyMs += performance.now() - this.#since;
  }

  /** Wraps one operation. */
  async time<T>(operation: () => Promise<T>): Promise<T> {
    this.begin();
    try {
      return await operation();
    } finally {
      this.end();
    }
  }

  get busyMs(): number {
    return this.#inFlight > 0 ? this.#busyMs + (performance.now() - this.#since) : this.#busyMs;
  }
}
