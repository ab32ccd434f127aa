import { SnapshiftError, messageOf } from '../core/errors.ts';
import type { QuiesceHooks } from './hypervisor.ts';

/** A guest agent's answer to a thaw when nothing is frozen (qemu-ga on Windows, some libvirt versions): nothing to undo. */
const nothingFrozen = /not frozen|not in progress|isn't frozen|no file ?systems? (?:are |were )?frozen/i;

/**
 * Takes the point in time with the guest's file systems frozen, and thaws on every path out: after it was
 * taken, after it failed, and after a freeze that failed or timed out, since the agent may have frozen some
 * file systems before it failed or after we stopped waiting (qemu-ga freezes them one by one; a late answer
 * still froze them). A thaw that fails after a failed freeze joins the freeze's error (one saying nothing
 * was frozen is no failure); one that fails after the point in time was taken fails it, so the caller undoes
 * it and the admin hears that the guest may still be frozen.
 */
export async function whileGuestFrozen<T>(quiesce: QuiesceHooks | undefined, takePointInTime: () => Promise<T>): Promise<T> {
  if (!quiesce) return takePointInTime();
  let taken: T;
  try {
    await quiesce.freeze();
    taken = await takePointInTime();
  } catch (error) {
    const thawError = await quiesce.thaw().then(
      () => undefined,
      (thawFailure: unknown) => (nothingFrozen.test(messageOf(thawFailure)) ? undefined : thawFailure),
    );
    if (thawError === undefined) throw error;
    const message = `${messageOf(error)}; thawing the guest's file systems afterwards failed too (${messageOf(thawError)}): make sure the guest is not left frozen`;
    throw error instanceof SnapshiftError ? new SnapshiftError(error.code, message, { cause: error }) : new Error(message, { cause: error });
  }
  try {
    await quiesce.thaw();
  } catch (error) {
    throw new SnapshiftError('QUIESCE_THAW_FAILED', `the point in time was taken, but thawing the guest's file systems failed (${messageOf(error)}): it is undone; make sure the guest is not left frozen`, { cause: error });
  }
  return taken;
}
