import { rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { exec } from '../../core/exec.ts';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { faultPoint, faultPointAfterIo } from '../../core/fault-points.ts';
import { pathExists } from '../../core/fs-probe.ts';
import { whileGuestFrozen } from '../guest-freeze.ts';
import type { DiskExport, Fleece, FleeceStats, VmDisk } from '../hypervisor.ts';
import { blockNodeNames } from './block-graph.ts';
import { bitmapRotationActions, type BitmapRotation } from './dirty-bitmaps.ts';
import { exportNodeReadOnly } from './qemu-nbd-export.ts';
import type { QmpSession } from './qmp-session.ts';
import { allocatedBytes } from '../overlay-vm-snapshot.ts';
import { ScratchGuard, type ScratchGuardOptions } from './scratch-guard.ts';

/*
 * How a point in time is read without a VM snapshot (QEMU docs, "Image fleecing"; QMP reference, blockdev-backup,
 * copy-before-write, snapshot-access). Measured here on QEMU 7.2 (Debian 7.2.22), qemu-storage-daemon and a VM:
 *
 * - One `transaction` per VM holds the bitmap rotations and a `blockdev-backup sync=none` per disk. The
 *   backup job puts a copy-before-write filter (we name it) above the disk's node, in the disk's place for
 *   every parent (guest device or export), inside the transaction's drained section: every disk and every
 *   bitmap is cut at the same instant. The transaction takes ~5–10 ms.
 * - Two ways to read the point in time, both with the job's filter doing the copying:
 *   `backing`: the scratch qcow2 has the disk's node as backing and is exported itself (the classic recipe,
 *   QEMU ≥ 2.12): copied blocks come from the scratch, the others from the disk below. Block-copy serialises
 *   its writes to a scratch backed by its source against reads of it, so a read racing the guest's first
 *   write to a block still sees the old data (0 wrong of 431 racing reads).
 *   `snapshot-access` (7.1+): a node on the filter that reads copied blocks from the scratch and the others
 *   from the disk, locked against guest writes. On 7.2 it serves wrong data: the filter asks its done-bitmap
 *   whether a range was copied with hbitmap_status(), which in 7.2 answers "not copied" for a copied run that
 *   is followed by uncopied blocks (QEMU commit a4d5224c2c "hbitmap: fix hbitmap_status() return value for
 *   first dirty bit case", in 8.0, not in Debian's 7.2.22), and the run is then read from the live disk.
 *   Measured: 543 of 864 one-MiB reads (NBD don't-fragment, one request per read) racing the guest's writes
 *   held data written after the point in time; block status goes through the same lookup, so a run the
 *   guest trimmed after the point in time could be reported as a hole. Reads of one 64 KiB cluster are
 *   immune, but a reader cannot be made to keep to that.
 *   So: `snapshot-access` on QEMU ≥ 8.0, `backing` before. What `backing` gives up: once the job is gone
 *   (cancelled by us, by an admin, or by QEMU) its scratch serves the live disk where nothing was copied,
 *   silently, where snapshot-access fails every read (measured: ENOTSUP). Hence: when we give the point in
 *   time up we delete its exports first, so a reader fails; and a reader calls `verifyIntact()` after reading:
 *   a job still running then ran throughout (a cancelled job never comes back), so what was read is the point
 *   in time.
 * - Our own `blockdev-add`ed copy-before-write filter would take `on-cbw-error=break-snapshot` and
 *   `cbw-timeout` (both 7.1+). But 7.2 can put a filter above a node only through a job: no blockdev-replace,
 *   exports cannot be re-pointed, and `qom-set <device> drive` (which works on a VM, measured) is no
 *   transaction action and does not exist for qemu-storage-daemon. So on 7.2 the job's filter it is, with its
 *   default `break-guest-write`: a scratch that fills up fails the guest's write (measured: ENOSPC to the
 *   guest). The ScratchGuard gives the point in time up before that can happen. Where blockdev-backup
 *   accepts `on-cbw-error` (newer QEMU; read from query-qmp-schema), we pass `break-snapshot` as well.
 *   `discard-source` (9.1) is for push backups out of a fleecing image and does not apply to pull reads.
 */

/** What a QEMU fleecing reports when released: besides what every adapter's does, how long its removal took. */
export interface QemuFleeceStats extends FleeceStats {
  releaseMs: number;
}

/** How exports read the point in time (see above): `snapshot-access` needs QEMU ≥ 8.0 to read right. */
export type FleeceReadScheme = 'backing' | 'snapshot-access';

/** One disk's fleecing as the ledger records it, before anything exists in QEMU. */
export interface FleeceScratch {
  diskName: string;
  /** The disk's node, under the copy-before-write filter while fleecing lives. */
  nodeName: string;
  scratchPath: string;
  scratchNodeName: string;
  jobId: string;
}

/** Where the intent to fleece is recorded before QEMU is asked, and cleared once all is removed. */
export interface FleecingLedger {
  recordIntent(scratch: FleeceScratch[]): number;
  clear(entryId: number): void;
}

export interface StartQemuFleecingOptions {
  /** Session tag (8 hex digits) in every name we give QEMU: `snapshift-<tag>-fleece-<n>`. */
  tag: string;
  /** Where scratch images go; default beside each disk image (same volume). Required for non-file disks. */
  scratchFolder?: string;
  /** Dirty-bitmap changes made in the same transaction, at the fleecing instant (changed-block tracking). */
  dirtyBitmaps?: readonly BitmapRotation[];
  ledger: FleecingLedger;
  /** When to give the point in time up rather than let a filling scratch fail the guest's writes. */
  scratchGuard?: ScratchGuardOptions;
  /** The NBD server the process already runs (qemu-storage-daemon's --nbd-server): exports' default. */
  nbdServerSocketPath?: string | null;
  /** Default: `snapshot-access` on QEMU ≥ 8.0, `backing` before (see the top of this file). */
  readScheme?: FleeceReadScheme;
  /** Guest file-system freeze just before the transaction, thaw right after it (application consistency). */
  quiesce?: { freeze(): Promise<void>; thaw(): Promise<void> };
  /** Where `exportDisk` starts an NBD server when the process runs none (a VM) and no socket is given. */
  exportSocketPath?: string;
}

export interface FleeceExportOptions {
  /** Default: the export's id, `snapshift-<tag>-fleece-<n>-export-<k>`. */
  exportName?: string;
  /** Unix socket for an NBD server we start if the QEMU process runs none; default the start's `exportSocketPath`. */
  socketPath?: string;
  /** The NBD server the process already runs (qemu-storage-daemon's --nbd-server). */
  existingServerSocketPath?: string | null;
  /** Dirty bitmaps of the disk's node to expose as `qemu:dirty-bitmap:NAME` (a frozen one: QEMU refuses a recording one). */
  bitmaps?: string[];
}

/**
 * The names one disk's fleecing gives QEMU. Node names are at most 31 characters (QEMU's BlockDriverState
 * node_name[32]: "Node name too long") and `snapshift-<tag>-fleece-<n>` takes 27 already, so the two extra
 * nodes get one-letter suffixes: `-w` for the copy-before-write filter (where the guest's writes pass) and
 * `-r` for the snapshot-access node (where the backup reads). The scratch's protocol node is left to QEMU
 * to name; it goes with the scratch node.
 */
export interface FleeceNames {
  /** The backup job (sync=none) that owns the copy-before-write filter. */
  jobId: string;
  /** The scratch qcow2 node. */
  scratchNodeName: string;
  /** The job's copy-before-write filter, above the disk's node. */
  filterNodeName: string;
  /** The snapshot-access node (readScheme `snapshot-access`), what exports then read. */
  accessNodeName: string;
  /** Exports of the access node are `<exportIdPrefix><k>` (ids are not length-limited). */
  exportIdPrefix: string;
}

/** `snapshift-<tag>-fleece-<n>` and what hangs off it: nodes, job, exports. Group 1 is the tag, 2 the index. */
export const fleeceNamePattern = /^snapshift-([0-9a-f]{8})-fleece-(\d+)(?:-(?:w|r|export-\d+))?$/;
/** Scratch image file names. */
export const fleeceScratchFilePattern = /^snapshift-([0-9a-f]{8})-fleece-(\d+)\.qcow2$/;

export function fleeceNamesOf(tag: string, index: number): FleeceNames {
  const base = `snapshift-${tag}-fleece-${index}`;
  return { jobId: base, scratchNodeName: base, filterNodeName: `${base}-w`, accessNodeName: `${base}-r`, exportIdPrefix: `${base}-export-` };
}

const fileProtocols = new Set(['file', 'host_device']);

interface PlannedDisk {
  disk: VmDisk;
  index: number;
  names: FleeceNames;
  scratchPath: string;
}

/**
 * Starts fleecing `disks` of one QEMU process: their point in time, read through `exportDisk`, is the
 * instant of one QMP transaction that also applies `dirtyBitmaps`. The ledger row is written before
 * anything is created; a failure part-way undoes exactly what QEMU reports to exist, then throws.
 */
export async function startQemuFleecing(qmp: QmpSession, disks: readonly VmDisk[], options: StartQemuFleecingOptions): Promise<QemuFleece> {
  if (!/^[0-9a-f]{8}$/.test(options.tag)) throw new SnapshiftError('BAD_ARGUMENT', `fleecing tag "${options.tag}" is not 8 hex digits`);
  if (disks.length === 0) throw new SnapshiftError('VM_HAS_NO_DISKS', 'fleecing needs at least one disk');
  const planned: PlannedDisk[] = disks.map((disk, index) => {
    if (!fileProtocols.has(disk.protocol) && options.scratchFolder === undefined) {
      throw new SnapshiftError('FLEECING_FAILED', `disk ${disk.name} is on ${disk.protocol} (${disk.imagePath}): its scratch image needs a local folder (scratchFolder); the VM was not touched`);
    }
    const names = fleeceNamesOf(options.tag, index);
    const folder = options.scratchFolder ?? dirname(disk.imagePath);
    return { disk, index, names, scratchPath: join(folder, `${names.scratchNodeName}.qcow2`) };
  });
  const breakSnapshotSupported = await backupTakesOnCbwError(qmp);
  const readScheme = options.readScheme ?? ((await qemuMajorVersion(qmp)) >= 8 ? 'snapshot-access' : 'backing');

  const ledgerEntryId = options.ledger.recordIntent(
    planned.map(({ disk, names, scratchPath }) => ({ diskName: disk.name, nodeName: disk.nodeName, scratchPath, scratchNodeName: names.scratchNodeName, jobId: names.jobId })),
  );
  faultPoint('fleece.after-ledger-intent');
  const createdFiles: string[] = [];
  let transactionMs: number;
  let takenAt: Date;
  let startedAt: number;
  try {
    for (const { scratchPath } of planned) {
      if (await pathExists(scratchPath)) throw new SnapshiftError('FLEECING_FAILED', `scratch image ${scratchPath} exists already; it is not ours to overwrite`);
    }
    // In parallel (~40 ms each); a VM has a handful of disks. Same virtual size as the disk: the filter
    // refuses a target of another size.
    const creations = await Promise.allSettled(
      planned.map(async ({ disk, scratchPath }) => {
        await exec('qemu-img', ['create', '-q', '-f', 'qcow2', scratchPath, String(disk.virtualSizeBytes)], { code: 'FLEECING_FAILED' });
        createdFiles.push(scratchPath);
      }),
    );
    const failedCreation = creations.find((result) => result.status === 'rejected');
    if (failedCreation) throw failedCreation.reason;
    for (const { disk, names, scratchPath } of planned) {
      await qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': names.scratchNodeName,
        file: { driver: 'file', filename: scratchPath },
        ...(readScheme === 'backing' ? { backing: disk.nodeName } : {}),
        discard: 'unmap',
      });
    }
    let transactionStartedAt = 0;
    // Thawed at once, whatever the transaction's outcome: the guest's writes are copied from here on.
    await whileGuestFrozen(options.quiesce, async () => {
      transactionStartedAt = performance.now();
      const transaction = qmp.execute('transaction', {
        actions: [
          // Bitmaps first, as in the VM snapshot's transaction: all actions apply with the guest's I/O drained.
          ...bitmapRotationActions(options.dirtyBitmaps ?? []),
          ...planned.map(({ disk, names }) => ({
            type: 'blockdev-backup',
            data: {
              'job-id': names.jobId,
              device: disk.nodeName,
              target: names.scratchNodeName,
              sync: 'none',
              'filter-node-name': names.filterNodeName,
              ...(breakSnapshotSupported ? { 'on-cbw-error': 'break-snapshot' } : {}),
            },
          })),
        ],
      });
      await faultPointAfterIo('fleece.transaction-sent');
      await transaction;
    });
    startedAt = performance.now();
    takenAt = new Date();
    transactionMs = startedAt - transactionStartedAt;
    if (readScheme === 'snapshot-access') {
      for (const { names } of planned) {
        await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': names.accessNodeName, file: names.filterNodeName });
      }
    }
    faultPoint('fleece.after-start');
  } catch (error) {
    return undoFailedStart(qmp, planned, createdFiles, options.ledger, ledgerEntryId, error);
  }
  const fleece = new QemuFleece(qmp, planned, options.ledger, ledgerEntryId, {
    takenAt,
    startedAt,
    transactionMs,
    breakSnapshotSupported,
    readScheme,
    nbdServerSocketPath: options.nbdServerSocketPath,
    exportSocketPath: options.exportSocketPath,
  });
  fleece.watchScratch(options.scratchGuard ?? {});
  return fleece;
}

/**
 * After a failed start, removes what QEMU reports of ours (the transaction may have been carried out although
 * its answer was lost: QEMU answers one monitor's commands in order, so what we query next sees its outcome).
 * Undoing fleecing never loses a guest write: the scratch holds only old data. If QEMU cannot be asked, the
 * scratch files and the ledger row stay for the hunter. Always throws.
 */
async function undoFailedStart(qmp: QmpSession, planned: readonly PlannedDisk[], createdFiles: readonly string[], ledger: FleecingLedger, ledgerEntryId: number, error: unknown): Promise<never> {
  const why = messageOf(error);
  try {
    await removeFleeceFromQemu(qmp, planned.map((entry) => entry.names));
  } catch (undoError) {
    throw new SnapshiftError('FLEECING_FAILED', `could not start fleecing (${why}), and removing what it had created failed (${messageOf(undoError)}): its scratch images and ledger row stay for "snapshift hunt"`, {
      cause: error,
    });
  }
  await Promise.all(createdFiles.map((path) => rm(path, { force: true })));
  ledger.clear(ledgerEntryId);
  throw new SnapshiftError('FLEECING_FAILED', `could not start fleecing: ${why}`, { cause: error });
}

/** A running fleecing of one QEMU process's disks. */
export class QemuFleece implements Fleece {
  readonly takenAt: Date;
  /** How long the transaction took: the guest's I/O is drained for (at most) this long. */
  readonly transactionMs: number;
  /** Whether QEMU's blockdev-backup took `on-cbw-error=break-snapshot` (not on 7.2). */
  readonly breakSnapshotSupported: boolean;
  readonly readScheme: FleeceReadScheme;
  readonly #qmp: QmpSession;
  readonly #planned: readonly PlannedDisk[];
  readonly #ledger: FleecingLedger;
  readonly #ledgerEntryId: number;
  readonly #startedAt: number;
  readonly #nbdServerSocketPath: string | null | undefined;
  readonly #exportSocketPath: string | undefined;
  readonly #exports = new Set<DiskExport>();
  #exportCount = 0;
  #guard: ScratchGuard | undefined;
  #jobWatch: NodeJS.Timeout | undefined;
  #brokenReason: string | undefined;
  #breaking: Promise<void> | undefined;
  #release: Promise<QemuFleeceStats> | undefined;

  constructor(
    qmp: QmpSession,
    planned: readonly PlannedDisk[],
    ledger: FleecingLedger,
    ledgerEntryId: number,
    timing: {
      takenAt: Date;
      startedAt: number;
      transactionMs: number;
      breakSnapshotSupported: boolean;
      readScheme: FleeceReadScheme;
      nbdServerSocketPath?: string | null | undefined;
      exportSocketPath?: string | undefined;
    },
  ) {
    this.readScheme = timing.readScheme;
    this.#nbdServerSocketPath = timing.nbdServerSocketPath;
    this.#exportSocketPath = timing.exportSocketPath;
    this.#qmp = qmp;
    this.#planned = planned;
    this.#ledger = ledger;
    this.#ledgerEntryId = ledgerEntryId;
    this.takenAt = timing.takenAt;
    this.#startedAt = timing.startedAt;
    this.transactionMs = timing.transactionMs;
    this.breakSnapshotSupported = timing.breakSnapshotSupported;
  }

  get brokenReason(): string | undefined {
    return this.#brokenReason;
  }

  get released(): boolean {
    return this.#release !== undefined;
  }

  /** The scratch images, one per disk in the order given to `startQemuFleecing`. */
  get scratchPaths(): string[] {
    return this.#planned.map((entry) => entry.scratchPath);
  }

  /** Bytes the scratch images take now. */
  async scratchBytes(): Promise<number> {
    let total = 0;
    for (const { scratchPath } of this.#planned) total += await allocatedBytes(scratchPath);
    return total;
  }

  /** Starts the scratch guard and a look at the jobs every half second; both end the fleecing rather than the guest. */
  watchScratch(options: ScratchGuardOptions): void {
    this.#guard = new ScratchGuard(this.scratchPaths, options, (reason) => this.#giveUp(reason));
    this.#guard.start();
    const jobIds = new Set(this.#planned.map((entry) => entry.names.jobId));
    const lookAtJobs = async (): Promise<void> => {
      const running = await runningJobIds(this.#qmp);
      const ended = [...jobIds].filter((id) => !running.has(id));
      if (ended.length > 0) await this.#giveUp(`fleecing job ${ended[0]} ended (cancelled outside snapshift, or QEMU stopped it)`);
    };
    const schedule = (): void => {
      this.#jobWatch = setTimeout(() => {
        lookAtJobs().then(
          () => (this.#brokenReason || this.#release ? undefined : schedule()),
          () => (this.#brokenReason || this.#release ? undefined : schedule()),
        );
      }, 500);
      this.#jobWatch.unref();
    };
    schedule();
  }

  /**
   * Ends the copy-before-write now so the guest's writes go straight to its disks (the guest first: the
   * scratch may be filling up), then deletes our exports: after the job, a `backing` scratch would serve live
   * data as if it were the point in time (snapshot-access fails reads, measured: ENOTSUP). A read in between
   * is caught by `verifyIntact`. `brokenReason` says why; `verifyIntact` and `exportDisk` throw from here on.
   */
  async #giveUp(reason: string): Promise<void> {
    if (this.#brokenReason !== undefined || this.#release) return;
    this.#brokenReason = reason;
    this.#breaking = (async () => {
      for (const { names } of this.#planned) {
        await this.#qmp.execute('block-job-cancel', { device: names.jobId, force: true }).catch(() => undefined);
      }
      for (const diskExport of [...this.#exports]) await Promise.resolve(diskExport[Symbol.asyncDispose]()).catch(() => undefined);
    })();
    await this.#breaking;
  }

  /**
   * Throws FLEECING_BROKEN unless every disk's job still runs now. Call it after reading and before trusting
   * what was read: a job that runs now ran throughout (a cancelled job never comes back), so every read saw
   * the point in time.
   */
  async verifyIntact(): Promise<void> {
    if (this.#brokenReason !== undefined) throw new SnapshiftError('FLEECING_BROKEN', `the point in time was given up: ${this.#brokenReason}`);
    if (this.#release) throw new SnapshiftError('FLEECING_BROKEN', 'the fleecing was released');
    const running = await runningJobIds(this.#qmp);
    const ended = this.#planned.map((entry) => entry.names.jobId).filter((id) => !running.has(id));
    if (ended.length > 0) {
      const reason = `fleecing job ${ended[0]} ended (cancelled outside snapshift, or QEMU stopped it)`;
      await this.#giveUp(reason);
      throw new SnapshiftError('FLEECING_BROKEN', `the point in time was lost: ${reason}`);
    }
  }

  /** A read-only NBD export of disk `index` (of those given to the start) as it was at the point in time. */
  async exportDisk(disk: VmDisk, index: number, options: FleeceExportOptions = {}): Promise<DiskExport> {
    if (this.#release) throw new SnapshiftError('FLEECING_FAILED', `fleecing of disk ${disk.name} was released: nothing to export`);
    if (this.#brokenReason !== undefined) throw new SnapshiftError('FLEECING_BROKEN', `the point in time of disk ${disk.name} was given up: ${this.#brokenReason}`);
    const entry = this.#planned[index];
    if (!entry || entry.disk.name !== disk.name) throw new SnapshiftError('BAD_ARGUMENT', `disk ${disk.name} is not disk ${index} of this fleecing`);
    const pointInTimeNode = this.readScheme === 'snapshot-access' ? entry.names.accessNodeName : entry.names.scratchNodeName;
    const existingServerSocketPath = options.existingServerSocketPath ?? this.#nbdServerSocketPath;
    const socketPath = options.socketPath ?? this.#exportSocketPath ?? existingServerSocketPath;
    if (!socketPath) throw new SnapshiftError('BAD_ARGUMENT', `no socket for the NBD server to export disk ${disk.name} on (exportSocketPath)`);
    const exportId = `${entry.names.exportIdPrefix}${++this.#exportCount}`;
    const inner = await exportNodeReadOnly(this.#qmp, pointInTimeNode, {
      socketPath,
      existingServerSocketPath,
      exportName: options.exportName ?? exportId,
      exportId,
      bitmaps: options.bitmaps?.map((name) => ({ node: entry.disk.nodeName, name })),
    });
    let disposed: Promise<void> | undefined;
    const diskExport: DiskExport = {
      socketPath: inner.socketPath,
      exportName: inner.exportName,
      [Symbol.asyncDispose]: () => {
        disposed ??= (async () => {
          this.#exports.delete(diskExport);
          await inner[Symbol.asyncDispose]();
        })();
        return disposed;
      },
    };
    this.#exports.add(diskExport);
    return diskExport;
  }

  release(): Promise<QemuFleeceStats> {
    this.#release ??= this.#releaseOnce();
    return this.#release;
  }

  async #releaseOnce(): Promise<QemuFleeceStats> {
    clearTimeout(this.#jobWatch);
    await this.#guard?.stop();
    await this.#breaking;
    faultPoint('fleece.before-release');
    const scratchBytes = await this.scratchBytes();
    const lifetimeMs = performance.now() - this.#startedAt;
    const releaseStartedAt = performance.now();
    // Our exports first, through their own disposal (it also stops an NBD server we started); an export
    // that fails to go is caught by the sweep below, which reads what QEMU still has.
    for (const diskExport of [...this.#exports].reverse()) {
      await Promise.resolve(diskExport[Symbol.asyncDispose]()).catch(() => undefined);
    }
    try {
      await removeFleeceFromQemu(this.#qmp, this.#planned.map((entry) => entry.names));
    } catch (error) {
      throw new SnapshiftError('FLEECING_RELEASE_FAILED', `could not remove fleecing from QEMU (run "snapshift hunt" to retry): ${messageOf(error)}`, { cause: error });
    }
    await Promise.all(this.#planned.map((entry) => rm(entry.scratchPath, { force: true })));
    this.#ledger.clear(this.#ledgerEntryId);
    return { lifetimeMs, scratchBytes, releaseMs: performance.now() - releaseStartedAt };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }
}

/** The parts of a `query-block-jobs` entry we use (QMP reference: BlockJobInfo). */
interface BlockJobInfo {
  device: string;
  status: string;
}

/** What `removeFleeceFromQemu` removed. */
export interface RemovedFleecing {
  exports: string[];
  jobs: string[];
  nodes: string[];
}

/**
 * Removes from QEMU whatever exists of the fleecings named by `names`, in the only order QEMU accepts: exports
 * reading the access nodes, the access nodes, the jobs (cancelling one drops its copy-before-write filter,
 * and the guest writes straight to its disk again), then the scratch nodes. Every step reads QEMU's state
 * first, so it serves a release, an undo after a failed start and the hunter alike. Throws if something of
 * ours is still there at the end. `dryRun`: only reports what it would remove.
 */
export async function removeFleeceFromQemu(qmp: QmpSession, names: readonly FleeceNames[], options: { dryRun?: boolean } = {}): Promise<RemovedFleecing> {
  const dryRun = options.dryRun ?? false;
  const removed: RemovedFleecing = { exports: [], jobs: [], nodes: [] };
  const ourNodes = new Set(names.flatMap((entry) => [entry.accessNodeName, entry.filterNodeName, entry.scratchNodeName]));
  const ourJobs = new Set(names.map((entry) => entry.jobId));

  // Only exports of the point in time (an access or scratch node): the guest's own exports (and a VM's devices)
  // read the copy-before-write filter while it sits in the disk's place, and query-block-exports names it.
  const pointInTimeNodes = new Set(names.flatMap((entry) => [entry.accessNodeName, entry.scratchNodeName]));
  const exports = await qmp.execute<Array<{ id: string; 'node-name': string }>>('query-block-exports');
  for (const entry of exports) {
    if (!pointInTimeNodes.has(entry['node-name']) && !names.some((name) => entry.id.startsWith(name.exportIdPrefix))) continue;
    if (!dryRun) await deleteExport(qmp, entry.id);
    removed.exports.push(entry.id);
  }
  let inGraph = await blockNodeNames(qmp);
  for (const { accessNodeName } of names) {
    if (!inGraph.has(accessNodeName)) continue;
    if (!dryRun) await qmp.execute('blockdev-del', { 'node-name': accessNodeName });
    removed.nodes.push(accessNodeName);
  }
  for (const job of await qmp.execute<BlockJobInfo[]>('query-block-jobs')) {
    if (!ourJobs.has(job.device)) continue;
    if (!dryRun) await endJob(qmp, job.device);
    removed.jobs.push(job.device);
  }
  inGraph = await blockNodeNames(qmp);
  for (const { scratchNodeName } of names) {
    if (!inGraph.has(scratchNodeName)) continue;
    if (!dryRun) await qmp.execute('blockdev-del', { 'node-name': scratchNodeName });
    removed.nodes.push(scratchNodeName);
  }
  if (dryRun) return removed;
  inGraph = await blockNodeNames(qmp);
  const left = [...ourNodes].filter((name) => inGraph.has(name));
  if (left.length > 0) throw new SnapshiftError('FLEECING_RELEASE_FAILED', `QEMU still has fleecing node(s) ${left.join(', ')} after their removal`);
  return removed;
}

async function deleteExport(qmp: QmpSession, id: string): Promise<void> {
  const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.['id'] === id, { timeoutMs: 30_000 });
  deleted.catch(() => undefined);
  try {
    await qmp.execute('block-export-del', { id, mode: 'hard' });
  } catch (error) {
    // Gone meanwhile (its own disposal raced us): that is what we wanted.
    if ((await qmp.execute<Array<{ id: string }>>('query-block-exports')).some((entry) => entry.id === id)) throw error;
    return;
  }
  await deleted;
}

/** Cancels a fleecing job (force: a sync=none job has nothing to finish) and waits until QEMU has dropped it. */
async function endJob(qmp: QmpSession, jobId: string): Promise<void> {
  const deadline = Date.now() + 60_000;
  let cancelSent = false;
  for (;;) {
    const statusChange = qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => event.data?.['id'] === jobId, { timeoutMs: 250 }).catch(() => undefined);
    const job = (await qmp.execute<BlockJobInfo[]>('query-block-jobs')).find((candidate) => candidate.device === jobId);
    if (!job) return;
    if (Date.now() > deadline) throw new SnapshiftError('FLEECING_RELEASE_FAILED', `fleecing job ${jobId} is still ${job.status} a minute after it was cancelled`);
    if (job.status === 'concluded') await qmp.execute('job-dismiss', { id: jobId });
    else if (job.status === 'pending') await qmp.execute('job-finalize', { id: jobId });
    else if (!cancelSent && job.status !== 'aborting') {
      await qmp.execute('block-job-cancel', { device: jobId, force: true });
      cancelSent = true;
    }
    await statusChange;
  }
}

/** Ids of the block jobs that run (paused counts: the filter still copies while its job is paused). */
async function runningJobIds(qmp: QmpSession): Promise<Set<string>> {
  const jobs = await qmp.execute<BlockJobInfo[]>('query-block-jobs');
  return new Set(jobs.filter((job) => job.status === 'running' || job.status === 'paused' || job.status === 'ready').map((job) => job.device));
}

async function qemuMajorVersion(qmp: QmpSession): Promise<number> {
  return (await qmp.execute<{ qemu: { major: number } }>('query-version')).qemu.major;
}

const onCbwErrorSupport = new WeakMap<QmpSession, boolean>();

/** Whether this QEMU's blockdev-backup takes `on-cbw-error` (QMP introspection; not on 7.2). */
async function backupTakesOnCbwError(qmp: QmpSession): Promise<boolean> {
  const known = onCbwErrorSupport.get(qmp);
  if (known !== undefined) return known;
  const schema = await qmp.execute<Array<{ name: string; 'meta-type': string; 'arg-type'?: string; members?: Array<{ name: string }> }>>('query-qmp-schema');
  const command = schema.find((entry) => entry['meta-type'] === 'command' && entry.name === 'blockdev-backup');
  const argumentsType = schema.find((entry) => entry.name === command?.['arg-type']);
  const supported = argumentsType?.members?.some((member) => member.name === 'on-cbw-error') ?? false;
  onCbwErrorSupport.set(qmp, supported);
  return supported;
}
