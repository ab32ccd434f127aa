import { rm } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { faultPoint } from '../../core/fault-points.ts';
import type { DiskExport, Fleece, FleeceOptions, FleeceStats, SnapshotLedger, VmDisk, VmSnapshotOverlay } from '../hypervisor.ts';
import { whileGuestFrozen } from '../guest-freeze.ts';
import { isLibvirtCbtPlan } from './libvirt-cbt.ts';
import { backupSocketPath, scratchFolderOf, scratchPath } from './libvirt-names.ts';
import { allocatedBytes } from '../overlay-vm-snapshot.ts';
import { pullBackupXml } from './libvirt-xml.ts';
import type { Virsh } from './virsh.ts';

/** What the ledger row of a libvirt fleecing carries: the hunter aborts the job serving `socketPath`. */
export interface LibvirtFleeceLedgerDetails {
  operation: 'fleecing';
  uri: string;
  domain: string;
  domainUuid: string;
  socketPath: string;
}

/**
 * Fleecing through libvirt: a pull-mode `backup-begin` whose NBD server (a unix socket under the run folder)
 * serves every disk as it was when the job began, while the guest writes on and copy-before-write puts old
 * blocks in a scratch file per disk (named with the tag; libvirt creates and deletes them). With a CBT plan
 * of ours the new checkpoint is created by the same job, and changed disks are exported incrementally (their
 * `backup-<disk>` bitmap is the changes since the previous checkpoint). Releasing aborts the job.
 */
export async function startLibvirtFleecing(virsh: Virsh, domain: { name: string; uuid: string; allTargets: readonly string[] }, disks: readonly VmDisk[], options: FleeceOptions): Promise<Fleece> {
  const socketPath = backupSocketPath(options.runDir, options.tag, 'fleece');
  const cbt = isLibvirtCbtPlan(options.cbt) ? options.cbt : undefined;
  const jobDisks = disks.map((disk) => ({
    name: disk.name,
    scratchPath: scratchPath(scratchFolderOf(disk.imagePath, disk.protocol, options.scratchFolder, options.runDir), disk.imagePath, options.tag, disk.name),
    incremental: cbt?.incrementalFrom(disk.name),
  }));
  const scratchFiles: VmSnapshotOverlay[] = jobDisks.map((disk, index) => ({ diskName: disk.name, baseNodeName: disks[index]!.imagePath, overlayNodeName: `snapshift-${options.tag}-fleece-${index}`, overlayPath: disk.scratchPath }));
  const details: LibvirtFleeceLedgerDetails = { operation: 'fleecing', uri: virsh.uri, domain: domain.name, domainUuid: domain.uuid, socketPath };
  const ledgerEntryId = options.ledger.recordIntent(scratchFiles, { ...details });
  faultPoint('fleece.after-ledger-intent');
  await rm(socketPath, { force: true });
  const wanted = new Set(disks.map((disk) => disk.name));
  try {
    await whileGuestFrozen(options.quiesce, () =>
      virsh.backupBegin(domain.name, pullBackupXml({ socketPath, disks: jobDisks, excludedDisks: domain.allTargets.filter((target) => !wanted.has(target)) }), cbt ? { checkpointXml: cbt.newCheckpointXml } : {}),
    );
  } catch (error) {
    await undoFailedStart(virsh, domain.name, socketPath, scratchFiles, options.ledger, ledgerEntryId, error);
  }
  faultPoint('fleece.after-start');
  if (cbt) await cbt.trackingStartedWithJob(socketPath);
  return new LibvirtFleece(virsh, domain.name, socketPath, scratchFiles, options.ledger, ledgerEntryId);
}

/** A job that may have started although virsh failed is aborted; libvirt removes what it made. Always throws. */
async function undoFailedStart(virsh: Virsh, domain: string, socketPath: string, scratchFiles: readonly VmSnapshotOverlay[], ledger: SnapshotLedger, ledgerEntryId: number, error: unknown): Promise<never> {
  try {
    const job = await virsh.backupJob(domain);
    if (job?.server?.socketPath === socketPath) await virsh.jobAbort(domain);
  } catch (undoError) {
    throw new SnapshiftError('FLEECING_FAILED', `could not start fleecing of ${domain} (${messageOf(error)}), nor find out whether libvirt did (${messageOf(undoError)}): run "snapshift hunt"`, { cause: error });
  }
  // A scratch file libvirt refused because it existed is not ours: only a file of this job is removed, and that only
  // when libvirt made it (it did not if it refused). Named with our tag, it cannot be anybody else's.
  await Promise.all(scratchFiles.map((file) => rm(file.overlayPath, { force: true })));
  ledger.clear(ledgerEntryId);
  throw new SnapshiftError('FLEECING_FAILED', `could not start fleecing of ${domain}: ${messageOf(error)}`, { cause: error });
}

class LibvirtFleece implements Fleece {
  readonly takenAt = new Date();
  readonly #startedAt = performance.now();
  #release: Promise<FleeceStats> | undefined;

  constructor(
    private readonly virsh: Virsh,
    private readonly domain: string,
    private readonly socketPath: string,
    private readonly scratchFiles: readonly VmSnapshotOverlay[],
    private readonly ledger: SnapshotLedger,
    private readonly ledgerEntryId: number,
  ) {}

  /** libvirt's own export of the disk (named after its target); the job owns it, so disposing it does nothing. */
  async exportDisk(disk: VmDisk): Promise<DiskExport> {
    if (this.#release) throw new SnapshiftError('FLEECING_FAILED', `the fleecing of ${this.domain} was released already`);
    return { socketPath: this.socketPath, exportName: disk.name, async [Symbol.asyncDispose]() {} };
  }

  /** The job must still run: one that ended (aborted by someone, or failed) no longer served a single instant. */
  async verifyIntact(): Promise<void> {
    const job = await this.virsh.backupJob(this.domain);
    if (job?.server?.socketPath === this.socketPath) return;
    const ended = await this.virsh.jobInfo(this.domain, { completed: true }).catch(() => undefined);
    throw new SnapshiftError('FLEECING_BROKEN', `the fleecing job of ${this.domain} ended before the copy finished${ended?.errorMessage ? ` (libvirt: ${ended.errorMessage})` : ''}: what was read is not one point in time`);
  }

  release(): Promise<FleeceStats> {
    this.#release ??= this.#releaseNow();
    return this.#release;
  }

  async #releaseNow(): Promise<FleeceStats> {
    faultPoint('fleece.before-release');
    // Measured before the abort: libvirt deletes the scratch files right after the job ends.
    let scratchBytes = 0;
    for (const file of this.scratchFiles) scratchBytes += await allocatedBytes(file.overlayPath);
    try {
      const job = await this.virsh.backupJob(this.domain);
      if (job?.server?.socketPath === this.socketPath) await this.virsh.jobAbort(this.domain);
    } catch (error) {
      throw new SnapshiftError('FLEECING_RELEASE_FAILED', `could not end the fleecing job of ${this.domain} (run "snapshift hunt" to retry): ${messageOf(error)}`, { cause: error });
    }
    this.ledger.clear(this.ledgerEntryId);
    return { lifetimeMs: performance.now() - this.#startedAt, scratchBytes };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }
}
