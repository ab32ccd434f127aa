/**
 * Node 20 has no AsyncDisposableStack: this small one undoes registered steps in reverse order.
 * A failing undo step does not stop the others; the first failure is rethrown after all have run,
 * so a cleanup error never hides that the rest was cleaned.
 */
export class CleanupStack implements AsyncDisposable {
  readonly #steps: Array<{ label: string; undo: () => PromiseLike<void> | void }> = [];

  /** Registers `undo`, to run when the stack is disposed. */
  defer(label: string, undo: () => PromiseLike<void> | void): void {
    this.#steps.push({ label, undo });
  }

  /** Registers an AsyncDisposable and returns it. */
  use<T extends AsyncDisposable>(label: string, resource: T): T {
    this.defer(label, () => resource[Symbol.asyncDispose]());
    return resource;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    const failures: unknown[] = [];
    while (this.#steps.length > 0) {
      const step = this.#steps.pop()!;
      try {
        await step.undo();
      } catch (error) {
        failures.push(new Error(`cleanup step "${step.label}" failed: ${error instanceof Error ? error.message : String(error)}`, { cause: error }));
      }
    }
    if (failures.length === 1) throw failures[0];
    if (failures.length > 1) throw new AggregateError(failures, 'several cleanup steps failed');
  }
}
