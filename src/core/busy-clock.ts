/**
 * Measures how long a pipeline stage was busy: the union of the intervals in which at least one of its
 * operations was in flight. Overlapping operations count once, so the figure compares with wall time
 * (a sum of overlapping intervals can exceed it: a pack being sealed while the next one fills).
 */
export class BusyClock {
  #inFlight = 0;
  #since = 0;
  #busyMs = 0;

  /** `now` is replaceable so tests can drive the clock with synthetic intervals. */
  constructor(private readonly now: () => number = () => performance.now()) {}

  begin(): void {
    if (this.#inFlight++ === 0) this.#since = this.now();
  }

  end(): void {
    if (this.#inFlight === 0) throw new Error('BusyClock.end() without a matching begin()');
    if (--this.#inFlight === 0) this.#busyMs += this.now() - this.#since;
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
    return this.#inFlight > 0 ? this.#busyMs + (this.now() - this.#since) : this.#busyMs;
  }
}
