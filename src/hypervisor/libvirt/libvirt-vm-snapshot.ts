import { rm } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { faultPoint } from '../../core/fault-points.ts';
import type { SnapshotLedger, VmDisk, VmSnapshot, VmSnapshotOptions, VmSnapshotOverlay } from '../hypervisor.ts';
import { nextOverlayPath } from '../overlay-path.ts';
import { assertSnapshottable, isFileProtocol, OverlayVmSnapshot } from '../overlay-vm-snapshot.ts';
import { whileGuestFrozen } from '../guest-freeze.ts';
import { isLibvirtCbtPlan } from './libvirt-cbt.ts';
import type { Virsh } from './virsh.ts';

/** What the ledger row of a libvirt VM snapshot carries besides its overlays: how the hunter reaches the domain. */
export interface LibvirtSnapshotLedgerDetails {
  operation: 'snapshot';
  uri: string;
  domain: string;
  domainUuid: string;
}

/**
 * Takes one disk-only external snapshot of all `disks` at one instant (`snapshot-create-as --disk-only
 * --atomic --no-metadata`): a qcow2 overlay per disk, beside its image, becomes the active layer and the base
 * turns read-only. The ledger row is written before libvirt is asked; libvirt keeps no record of it.
 */
export async function takeLibvirtVmSnapshot(virsh: Virsh, domain: { name: string; uuid: string; allTargets: readonly string[] }, disks: readonly VmDisk[], options: VmSnapshotOptions): Promise<VmSnapshot> {
  assertSnapshottable(disks, options.overlayFolder);
  const taken = new Set<string>();
  const overlays: VmSnapshotOverlay[] = disks.map((disk, index) => {
    const overlayPath = nextOverlayPath(disk.imagePath, isFileProtocol(disk.protocol) ? undefined : options.overlayFolder, taken);
    taken.add(overlayPath);
    // libvirt has no node names: the base is named by its image, the overlay by our tag (for people reading the ledger).
    return { diskName: disk.name, baseNodeName: disk.imagePath, overlayNodeName: `snapshift-${options.tag}-${index}`, overlayPath };
  });
  const details: LibvirtSnapshotLedgerDetails = { operation: 'snapshot', uri: virsh.uri, domain: domain.name, domainUuid: domain.uuid };
  const ledgerEntryId = options.ledger.recordIntent(overlays, { ...details });
  faultPoint('vm-snapshot.after-ledger-intent');

  // The new checkpoint just before the snapshot: writes in between are in both it and the base (read twice, never missed).
  if (isLibvirtCbtPlan(options.cbt)) await options.cbt.startTracking();
  try {
    // Thawed before any undo below: the guest waits on its frozen file systems no longer than the snapshot.
    await whileGuestFrozen(options.quiesce, async () => {
      const wanted = new Set(disks.map((disk) => disk.name));
      await virsh.snapshotCreateDiskOnly(domain.name, {
        overlays: overlays.map((overlay) => ({ disk: overlay.diskName, overlayPath: overlay.overlayPath })),
        // Every other disk explicitly not: libvirt would give an unnamed disk an overlay of its own choosing.
        excludedDisks: domain.allTargets.filter((target) => !wanted.has(target)),
      });
      faultPoint('vm-snapshot.after-transaction');
    });
  } catch (error) {
    await undoFailedSnapshot(virsh, domain.name, overlays, options.ledger, ledgerEntryId, error);
  }
  return new OverlayVmSnapshot(domain.name, overlays, options.ledger, ledgerEntryId, async (overlay) => {
    await commitLibvirtOverlay(virsh, domain.name, overlay);
    await rm(overlay.overlayPath, { force: true });
  });
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
