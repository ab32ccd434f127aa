/**
 * Named fault points: places where a crash matters, each with a stable name. `SNAPSHIFT_FAULT=<point>` (test
 * only, docs/NOTES.md § Fault points) makes the process SIGKILL itself the first time it reaches that point;
 * `SNAPSHIFT_FAULT=<point>@N` the N-th time. A SIGKILL, not an exception: no `finally`, no cleanup stack and
 * no signal handler runs, exactly as when the OOM killer or a power cut strikes.
 */
export const faultPoints = [
  // One backup task, in the order a task meets them.
  'backup.after-hunt',
  'backup.after-writer-start',
  'vm-snapshot.after-ledger-intent',
  'vm-snapshot.transaction-sent',
  'vm-snapshot.after-transaction',
  'storage-snapshot.after-ledger-intent',
  'storage-snapshot.after-snapshot',
  'commit.before-job',
  'commit.job-started',
  'commit.ready',
  'commit.complete-sent',
  'commit.after-completed',
  'commit.after-overlay-removed',
  'vm-snapshot.after-commit',
  'copy.export-added',
  'copy.mid-copy',
  'copy.after-copy',
  'storage-snapshot.after-copy',
  'storage-snapshot.after-removal',
  // Fleecing (copy-before-write, no delta file and no commit).
  'fleece.after-ledger-intent',
  'fleece.transaction-sent',
  'fleece.after-start',
  'fleece.before-release',
  // The repository's side of a backup.
  'repo.after-pack-write',
  'repo.after-last-pack',
  'repo.after-index-write',
  'repo.before-manifest-rename',
  'repo.after-manifest-rename',
  'backup.after-catalog-record',
  'cbt.after-finish',
  // Jobs, retention, forget, gc, restore, the daemon.
  'job.after-session-start',
  'job.before-retention',
  'retention.mid-forget',
  'gc.after-new-index',
  'gc.mid-sweep',
  'restore.mid-copy',
  'restore.before-rename',
  'daemon.after-job-start',
  'hunt.before-commit',
  // File-level restore: a run killed with its disk reader, loop device and mount up.
  'files.after-mount',
] as const;

export type FaultPoint = (typeof faultPoints)[number];

const known = new Set<string>(faultPoints);
let armed: { point: string; remaining: number } | undefined | null = null;

function armedPoint(): { point: string; remaining: number } | undefined {
  if (armed === null) {
    const setting = process.env['SNAPSHIFT_FAULT'];
    if (!setting) {
      armed = undefined;
    } else {
      const [point, count] = setting.split('@') as [string, string | undefined];
      if (!known.has(point)) throw new Error(`SNAPSHIFT_FAULT=${setting}: no such fault point (see docs/NOTES.md § Fault points)`);
      const times = count === undefined ? 1 : Number(count);
      if (!Number.isSafeInteger(times) || times < 1) throw new Error(`SNAPSHIFT_FAULT=${setting}: the count after @ must be a positive integer`);
      armed = { point, remaining: times };
    }
  }
  return armed;
}

/** SIGKILLs this process if `SNAPSHIFT_FAULT` names `point` and this is the time it asked for; else nothing. */
export function faultPoint(point: FaultPoint): void {
  const fault = armedPoint();
  if (!fault || fault.point !== point) return;
  if (--fault.remaining > 0) return;
  process.stderr.write(`SNAPSHIFT_FAULT: killing process ${process.pid} at ${point}\n`);
  process.kill(process.pid, 'SIGKILL');
}

/** Like `faultPoint`, but first lets bytes already handed to sockets leave the process (a QMP command "in flight"). */
export async function faultPointAfterIo(point: FaultPoint): Promise<void> {
  const fault = armedPoint();
  if (!fault || fault.point !== point) return;
  await new Promise((resolve) => setTimeout(resolve, 20));
  faultPoint(point);
}
