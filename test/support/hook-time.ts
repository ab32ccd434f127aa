/**
 * The time a test spends inside a window the product measures. A hook such as `afterVmSnapshots` runs while the
 * VM snapshot lives, so its duration (an md5, a reflink copy, a guest write: the test's work, slowed by whatever
 * else the machine runs) is part of `vmSnapshotLifetimeMs`. Wrap the hooks and subtract `ms`, so a timing
 * assertion measures the product's own window and nothing of the test's.
 */
export class HookTime {
  ms = 0;

  wrap(hook: () => Promise<void> | void): () => Promise<void> {
    return async () => {
      const started = performance.now();
      try {
        await hook();
      } finally {
        this.ms += performance.now() - started;
      }
    };
  }
}
