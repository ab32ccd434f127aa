import { ExitStatus } from '../core/errors.ts';

/** Exit status of a command stopped by Ctrl-C or SIGTERM after undoing its work (README § Exit statuses). */
export const stoppedExitStatus = ExitStatus.stopped;

/**
 * Runs `work` with an AbortSignal that the first Ctrl-C or SIGTERM aborts, so the command stops cleanly
 * (snapshots undone, no partial result) instead of dying mid-step. `what` tells the user what is undone.
 * A second signal does nothing more: the undo in progress (e.g. a VM snapshot commit) must finish.
 */
export async function withStopSignals<T>(what: string, work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const stop = (signal: NodeJS.Signals) => {
    if (!controller.signal.aborted) process.stderr.write(`\nsnapshift: ${signal}: stopping cleanly (${what})\n`);
    controller.abort(new StopRequested(signal));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  try {
    return await work(controller.signal);
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
  }
}

/** The abort reason `withStopSignals` gives: a person asked the command to stop. */
export class StopRequested extends Error {
  override readonly name = 'StopRequested';
  constructor(readonly signal: NodeJS.Signals) {
    super(`${signal} received`);
  }
}
