import { rm, stat } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { faultPoint } from '../../core/fault-points.ts';
import type { SnapshotLedger, VmDisk, VmSnapshot, VmSnapshotOptions, VmSnapshotOverlay, VmSnapshotStats } from '../hypervisor.ts';
import { nextOverlayPath } from '../qemu/overlay-path.ts';
import { assertSnapshottable } from '../qemu/qemu-vm-snapshot.ts';
import { isLibvirtCbtPlan } from './libvirt-cbt.ts';
import type { Virsh } from './virsh.ts';

/** What the ledger row of a libvirt VM snapshot carries besides its overlays: how the hunter reaches the domain. */
export interface LibvirtSnapshotLedgerDetails {
  operation: 'snapshot';
  uri: string;
  domain: string;
  domainUuid: string;
}

const fileProtocols = new Set(['file', 'host_device']);

/**
 * Takes one disk-only external snapshot of all `disks` at one instant (`snapshot-create-as --disk-only
 * --atomic --no-metadata`): a qcow2 overlay per disk, beside its image, becomes the active layer and the base
 * turns read-only. The ledger row is written before libvirt is asked; libvirt keeps no record of it.
 */
export async function takeLibvirtVmSnapshot(virsh: Virsh, domain: { name: string; uuid: string; allTargets: readonly string[] }, disks: readonly VmDisk[], options: VmSnapshotOptions): Promise<VmSnapshot> {
  assertSnapshottable(disks, options.overlayFolder);
  const taken = new Set<string>();
  const overlays: VmSnapshotOverlay[] = disks.map((disk, index) => {
    const overlayPath = nextOverlayPath(disk.imagePath, fileProtocols.has(disk.protocol) ? undefined : options.overlayFolder, taken);
    taken.add(overlayPath);
    // libvirt has no node names: the base is named by its image, the overlay by our tag (for people reading the ledger).
    return { diskName: disk.name, baseNodeName: disk.imagePath, overlayNodeName: `snapshift-${options.tag}-${index}`, overlayPath };
  });
  const details: LibvirtSnapshotLedgerDetails = { operation: 'snapshot', uri: virsh.uri, domain: domain.name, domainUuid: domain.uuid };
  const ledgerEntryId = options.ledger.recordIntent(overlays, { ...details });
  faultPoint('vm-snapshot.after-ledger-intent');

  // The new checkpoint just before the snapshot: writes in between are in both it and the base (read twice, never missed).
  if (isLibvirtCbtPlan(options.cbt)) await options.cbt.startTracking();
  let frozen = false;
  try {
    if (options.quiesce) {
      await options.quiesce.freeze();
      frozen = true;
    }
    const wanted = new Set(disks.map((disk) => disk.name));
    await virsh.snapshotCreateDiskOnly(domain.name, {
      overlays: overlays.map((overlay) => ({ disk: overlay.diskName, overlayPath: overlay.overlayPath })),
      // Every other disk explicitly not: libvirt would give an unnamed disk an overlay of its own choosing.
      excludedDisks: domain.allTargets.filter((target) => !wanted.has(target)),
    });
    faultPoint('vm-snapshot.after-transaction');
  } catch (error) {
    await undoFailedSnapshot(virsh, domain.name, overlays, options.ledger, ledgerEntryId, error);
  } finally {
    if (frozen) await options.quiesce!.thaw();
  }
  return new LibvirtVmSnapshot(virsh, domain.name, overlays, options.ledger, ledgerEntryId);
}

/**
 * After snapshot-create-as failed: `--atomic` means libvirt either made every overlay active or none, but a
 * virsh that timed out may not have heard which. The live XML says: overlays that became active are committed
 * at once; otherwise files libvirt may have left go, with the ledger row. Always throws.
 */
async function undoFailedSnapshot(virsh: Virsh, domain: string, overlays: readonly VmSnapshotOverlay[], ledger: SnapshotLedger, ledgerEntryId: number, error: unknown): Promise<never> {
  const why = messageOf(error);
  let active: VmSnapshotOverlay[];
  try {
    const paths = new Map((await virsh.disks(domain)).map((disk) => [disk.target, disk.path]));
    active = overlays.filter((overlay) => paths.get(overlay.diskName) === overlay.overlayPath);
  } catch (queryError) {
    throw new SnapshiftError('VM_SNAPSHOT_FAILED', `could not take the VM snapshot of ${domain} (${why}), and libvirt cannot tell whether it did (${messageOf(queryError)}): its overlays and ledger row stay for "snapshift hunt"`, { cause: error });
  }
  const failures: string[] = [];
  for (const overlay of active) await commitLibvirtOverlay(virsh, domain, overlay).catch((commitError: unknown) => failures.push(messageOf(commitError)));
  if (failures.length > 0) {
    throw new SnapshiftError('VM_SNAPSHOT_FAILED', `the VM snapshot of ${domain} failed (${why}) after libvirt had taken it, and committing it failed (${failures[0]}): run "snapshift hunt"`, { cause: error });
  }
  await Promise.all(overlays.map((overlay) => rm(overlay.overlayPath, { force: true })));
  ledger.clear(ledgerEntryId);
  throw new SnapshiftError('VM_SNAPSHOT_FAILED', `could not take the VM snapshot of ${domain}: ${why}${active.length > 0 ? ' (libvirt had taken it: committed at once)' : ''}`, { cause: error });
}

/**
 * Merges one overlay back into its base and pivots the disk onto the base: `blockcommit --active --pivot`
 * down to the base only, or, when a commit of it already runs (one whose waiter died), that job is finished.
 * Returns false when the disk no longer runs on the overlay (nothing to commit).
 */
export async function commitLibvirtOverlay(virsh: Virsh, domain: string, overlay: Pick<VmSnapshotOverlay, 'diskName' | 'overlayPath' | 'baseNodeName'>): Promise<boolean> {
  const disk = (await virsh.disks(domain)).find((candidate) => candidate.target === overlay.diskName);
  if (disk?.path !== overlay.overlayPath) return false;
  if (disk.mirror !== undefined || (await virsh.blockJob(domain, overlay.diskName)) !== undefined) {
    // A commit a killed task started goes on in libvirt: finish it rather than being refused a second one.
    await virsh.finishActiveCommit(domain, overlay.diskName);
  } else {
    await virsh.blockCommitActive(domain, overlay.diskName, { base: overlay.baseNodeName });
  }
  const after = (await virsh.disks(domain)).find((candidate) => candidate.target === overlay.diskName);
  if (after?.path === overlay.overlayPath) {
    throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `disk ${overlay.diskName} of ${domain} still runs on ${overlay.overlayPath} after its commit`);
  }
  return true;
}

class LibvirtVmSnapshot implements VmSnapshot {
  readonly takenAt = new Date();
  readonly #startedAt = performance.now();
  #commit: Promise<VmSnapshotStats> | undefined;

  constructor(
    private readonly virsh: Virsh,
    private readonly domain: string,
    readonly overlays: readonly VmSnapshotOverlay[],
    private readonly ledger: SnapshotLedger,
    private readonly ledgerEntryId: number,
  ) {}

  get committed(): boolean {
    return this.#commit !== undefined;
  }

  commit(): Promise<VmSnapshotStats> {
    this.#commit ??= this.#commitAll();
    return this.#commit;
  }

  async #commitAll(): Promise<VmSnapshotStats> {
    let deltaBytesAtCommit = 0;
    for (const overlay of this.overlays) deltaBytesAtCommit += await allocatedBytes(overlay.overlayPath);
    const commitStartedAt = performance.now();
    // Every disk even if one fails, so as few overlays as possible stay; the ledger row stays until all are gone.
    const failures: unknown[] = [];
    for (const overlay of this.overlays) {
      try {
        await commitLibvirtOverlay(this.virsh, this.domain, overlay);
        await rm(overlay.overlayPath, { force: true });
      } catch (error) {
        failures.push(error);
      }
    }
    const commitMs = performance.now() - commitStartedAt;
    if (failures.length > 0) {
      throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `could not commit the VM snapshot of ${this.domain} (run "snapshift hunt" to retry): ${messageOf(failures[0])}`, { cause: failures[0] });
    }
    faultPoint('vm-snapshot.after-commit');
    this.ledger.clear(this.ledgerEntryId);
    return { lifetimeMs: performance.now() - this.#startedAt, deltaBytesAtCommit, commitMs };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.commit();
  }
}

/** Bytes a file occupies on its storage (0 when gone). */
export async function allocatedBytes(path: string): Promise<number> {
  try {
    return (await stat(path)).blocks * 512;
  } catch {
    return 0;
  }
}
