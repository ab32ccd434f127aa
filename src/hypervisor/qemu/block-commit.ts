import { rm } from 'node:fs/promises';
import { SnapshiftError } from '../../core/errors.ts';
import { faultPoint } from '../../core/fault-points.ts';
import type { VmSnapshotOverlay } from '../hypervisor.ts';
import type { QmpSession } from './qmp-session.ts';
import { blockNodeNames } from './block-graph.ts';

/** How long a commit may go without its job making any progress before we give up (a stuck storage). */
const stalledAfterMs = 30 * 60_000;
/** Between two looks at the job when no status event arrives: events are the fast path, polls the safe one. */
const pollEveryMs = 250;

/** The parts of a `query-block-jobs` entry we use (QMP reference: BlockJobInfo). */
interface BlockJobInfo {
  device: string;
  type: string;
  status: 'undefined' | 'created' | 'running' | 'paused' | 'ready' | 'standby' | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null';
  offset: number;
  len: number;
  ready: boolean;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
  error?: string;
}

/** The job id we give the commit of an overlay: stable, so a later process can find and adopt it. */
function commitJobId(overlayNodeName: string): string {
  return `${overlayNodeName}-commit`;
}

/**
 * Merges an active overlay back into its base and deletes the overlay file (QMP reference, "Live block
 * commit": `block-commit` of the active layer, READY, `block-job-complete`, COMPLETED).
 *
 * A commit a killed process left behind is adopted, whatever state its job is in (running, ready, paused,
 * pending, concluded): a second `block-commit` on a node with a job is refused by QEMU ("block device is in
 * use by block job"), so starting one is never the answer. Success is judged from the block graph, not
 * from events we may have missed: the commit is done when the overlay node has left the graph.
 */
export async function commitOverlay(qmp: QmpSession, overlay: Pick<VmSnapshotOverlay, 'baseNodeName' | 'overlayNodeName' | 'overlayPath'>): Promise<void> {
  const jobId = commitJobId(overlay.overlayNodeName);
  // Only for the error text: success or failure is read from the block graph below.
  let lastError: string | undefined;
  qmp
    .waitForEvent('BLOCK_JOB_COMPLETED', (event) => event.data?.device === jobId, { timeoutMs: stalledAfterMs })
    .then((event) => (lastError = typeof event.data?.error === 'string' ? event.data.error : undefined))
    .catch(() => undefined);
  if (!(await findJob(qmp, jobId))) {
    if (!(await nodeIsInGraph(qmp, overlay.overlayNodeName))) throw notActive(overlay);
    faultPoint('commit.before-job');
    await qmp.execute('block-commit', { 'job-id': jobId, device: overlay.overlayNodeName, 'base-node': overlay.baseNodeName });
    faultPoint('commit.job-started');
  }
  await driveJobToEnd(qmp, jobId);
  if (await nodeIsInGraph(qmp, overlay.overlayNodeName)) {
    throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `commit job ${jobId} ended but ${overlay.overlayNodeName} is still the active layer: ${lastError ?? 'the job was cancelled'}`);
  }
  faultPoint('commit.after-completed');
  await rm(overlay.overlayPath, { force: true });
  faultPoint('commit.after-overlay-removed');
}

/**
 * Moves a commit job along until QEMU has dropped it: completes it once READY, resumes it if paused,
 * finalizes and dismisses it where it waits for that. Between steps it waits for the job's next status
 * change (or a short poll), so a fast job costs no fixed delay.
 */
async function driveJobToEnd(qmp: QmpSession, jobId: string): Promise<void> {
  let progressAt = Date.now();
  let lastOffset = -1;
  let completeSent = false;
  for (;;) {
    const statusChange = qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => event.data?.id === jobId, { timeoutMs: pollEveryMs }).catch(() => undefined);
    const job = await findJob(qmp, jobId);
    if (!job) return;
    if (job.offset !== lastOffset) {
      lastOffset = job.offset;
      progressAt = Date.now();
    }
    if (Date.now() - progressAt > stalledAfterMs) {
      throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `commit job ${jobId} made no progress for ${stalledAfterMs / 60_000} min (status ${job.status}); it is still running in QEMU`);
    }
    switch (job.status) {
      case 'ready':
        if (!completeSent) {
          faultPoint('commit.ready');
          await qmp.execute('block-job-complete', { device: jobId });
          completeSent = true;
          faultPoint('commit.complete-sent');
        }
        break;
      case 'paused':
        await qmp.execute('block-job-resume', { device: jobId });
        break;
      case 'pending':
        if (job['auto-finalize'] === false) await qmp.execute('block-job-finalize', { id: jobId });
        break;
      case 'concluded':
        if (job.error) throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `commit job ${jobId} failed: ${job.error}`);
        await qmp.execute('block-job-dismiss', { id: jobId });
        continue;
      default:
        // created, running, standby, waiting, aborting: QEMU moves it on by itself.
        break;
    }
    await statusChange;
  }
}

async function findJob(qmp: QmpSession, jobId: string): Promise<BlockJobInfo | undefined> {
  return (await qmp.execute<BlockJobInfo[]>('query-block-jobs')).find((job) => job.device === jobId);
}

async function nodeIsInGraph(qmp: QmpSession, nodeName: string): Promise<boolean> {
  return (await blockNodeNames(qmp)).has(nodeName);
}

function notActive(overlay: Pick<VmSnapshotOverlay, 'overlayNodeName' | 'overlayPath'>): SnapshiftError {
  return new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `overlay ${overlay.overlayNodeName} (${overlay.overlayPath}) is not in QEMU's block graph: nothing to commit`);
}
