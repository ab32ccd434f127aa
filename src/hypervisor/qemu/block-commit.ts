import { rm } from 'node:fs/promises';
import { SnapshiftError } from '../../core/errors.ts';
import type { VmSnapshotOverlay } from '../hypervisor.ts';
import type { QmpSession } from './qmp-session.ts';

const readyTimeoutMs = 30 * 60_000;

/**
 * Merges an active overlay back into its base and deletes the overlay file: `block-commit` of the active
 * layer, wait for BLOCK_JOB_READY, `block-job-complete`, wait for BLOCK_JOB_COMPLETED (QMP reference,
 * "Live block commit"). The listeners are registered before each command so no event can slip past.
 */
export async function commitOverlay(qmp: QmpSession, overlay: Pick<VmSnapshotOverlay, 'baseNodeName' | 'overlayNodeName' | 'overlayPath'>): Promise<void> {
  const jobId = `${overlay.overlayNodeName}-commit`;
  const ready = qmp.waitForEvent('BLOCK_JOB_READY', (event) => event.data?.device === jobId, { timeoutMs: readyTimeoutMs });
  const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', (event) => event.data?.device === jobId, { timeoutMs: readyTimeoutMs });
  const cancelled = qmp.waitForEvent('BLOCK_JOB_CANCELLED', (event) => event.data?.device === jobId, { timeoutMs: readyTimeoutMs });
  // Unobserved rejections of the listeners we end up not awaiting must not crash the process.
  for (const promise of [ready, completed, cancelled]) promise.catch(() => undefined);

  await qmp.execute('block-commit', { 'job-id': jobId, device: overlay.overlayNodeName, 'base-node': overlay.baseNodeName });
  const first = await Promise.race([ready.then(() => 'ready' as const), completed.then((event) => event), cancelled.then(() => 'cancelled' as const)]);
  if (first === 'cancelled') throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `commit job ${jobId} was cancelled`);
  if (first !== 'ready') throw commitError(jobId, first.data);
  await qmp.execute('block-job-complete', { device: jobId });
  const done = await completed;
  if (done.data?.error) throw commitError(jobId, done.data);
  await rm(overlay.overlayPath, { force: true });
}

function commitError(jobId: string, data: Record<string, unknown> | undefined): SnapshiftError {
  return new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `commit job ${jobId} failed: ${String(data?.error ?? 'ended before it was ready')}`);
}
