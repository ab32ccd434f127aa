import { rm } from 'node:fs/promises';
import { SnapshiftError } from '../../core/errors.ts';
import type { SnapshotLedger, VmDisk, VmSnapshot, VmSnapshotOverlay } from '../hypervisor.ts';
import { nextOverlayPath } from '../overlay-path.ts';
import { assertSnapshottable, isFileProtocol, OverlayVmSnapshot } from '../overlay-vm-snapshot.ts';
import { commitOverlay } from './block-commit.ts';
import { blockNodeNames } from './block-graph.ts';
import { faultPoint, faultPointAfterIo } from '../../core/fault-points.ts';
import { bitmapRotationActions, type BitmapRotation } from './dirty-bitmaps.ts';
import type { QmpSession } from './qmp-session.ts';
import { whileGuestFrozen } from '../guest-freeze.ts';

export interface TakeVmSnapshotOptions {
  /** For messages. */
  vmName?: string;
  /** Tag in overlay node names so a crash's leftovers are recognisable: `snapshift-<tag>-<n>`. */
  tag: string;
  ledger: SnapshotLedger;
  /** Where overlays of non-file disks go (RBD, iSCSI); file disks always get theirs beside the image. */
  overlayFolder?: string;
  /** Runs while the snapshot is being taken, e.g. guest fsfreeze/thaw around it. */
  quiesce?: { freeze(): Promise<void>; thaw(): Promise<void> };
  /** Dirty-bitmap changes made in the same transaction, at the snapshot's instant (changed-block tracking). */
  dirtyBitmaps?: readonly BitmapRotation[];
}

/**
 * Takes one VM snapshot of all `disks` in a single QMP transaction, so every disk freezes at the same
 * instant: one external qcow2 overlay per disk becomes the active layer and the base turns read-only.
 */
export async function takeQemuVmSnapshot(qmp: QmpSession, disks: readonly VmDisk[], options: TakeVmSnapshotOptions): Promise<VmSnapshot> {
  assertSnapshottable(disks, options.overlayFolder);
  const taken = new Set<string>();
  const overlays: VmSnapshotOverlay[] = disks.map((disk, index) => {
    const overlayPath = nextOverlayPath(disk.imagePath, isFileProtocol(disk.protocol) ? undefined : options.overlayFolder, taken);
    taken.add(overlayPath);
    return { diskName: disk.name, baseNodeName: disk.nodeName, overlayNodeName: `snapshift-${options.tag}-${index}`, overlayPath };
  });

  const ledgerEntryId = options.ledger.recordIntent(overlays);
  faultPoint('vm-snapshot.after-ledger-intent');
  try {
    // Thawed before any undo below: the guest waits on its frozen file systems no longer than the transaction.
    await whileGuestFrozen(options.quiesce, async () => {
      const transaction = qmp.execute('transaction', {
        actions: [
          ...bitmapRotationActions(options.dirtyBitmaps ?? []),
          ...overlays.map((overlay) => ({
            type: 'blockdev-snapshot-sync',
            data: { 'node-name': overlay.baseNodeName, 'snapshot-file': overlay.overlayPath, 'snapshot-node-name': overlay.overlayNodeName, format: 'qcow2' },
          })),
        ],
      });
      await faultPointAfterIo('vm-snapshot.transaction-sent');
      await transaction;
      faultPoint('vm-snapshot.after-transaction');
    });
  } catch (error) {
    await undoFailedTransaction(qmp, overlays, options.ledger, ledgerEntryId, error);
  }
  return new OverlayVmSnapshot(options.vmName ?? 'the VM', overlays, options.ledger, ledgerEntryId, (overlay) => commitOverlay(qmp, overlay));
}

/**
 * After the snapshot transaction failed, finds out what QEMU actually did before touching anything. A
 * refused transaction (QEMU answered with an error) changed nothing: it is all-or-nothing, so the overlay
 * files QEMU may have created are unused and go, with the ledger row. A transaction that timed out or whose
 * connection broke may have been carried out: the block graph says. Overlays that became active are
 * committed at once (they may already hold guest writes); if QEMU cannot be asked, files and ledger row stay
 * for the hunter. Always throws.
 */
async function undoFailedTransaction(qmp: QmpSession, overlays: readonly VmSnapshotOverlay[], ledger: SnapshotLedger, ledgerEntryId: number, error: unknown): Promise<never> {
  const why = (error as Error).message;
  const refusedByQemu = error instanceof SnapshiftError && error.code === 'QMP_COMMAND_FAILED';
  let active: VmSnapshotOverlay[];
  try {
    const inGraph = await blockNodeNames(qmp);
    active = overlays.filter((overlay) => inGraph.has(overlay.overlayNodeName));
  } catch (queryError) {
    if (!refusedByQemu) {
      throw new SnapshiftError('VM_SNAPSHOT_FAILED', `could not take the VM snapshot (${why}), and QEMU cannot tell whether it did (${(queryError as Error).message}): its overlays and ledger row stay for "snapshift hunt"`, { cause: error });
    }
    active = [];
  }
  if (active.length === 0) {
    await Promise.all(overlays.map((overlay) => rm(overlay.overlayPath, { force: true })));
    ledger.clear(ledgerEntryId);
    throw new SnapshiftError('VM_SNAPSHOT_FAILED', `could not take the VM snapshot: ${why}`, { cause: error });
  }
  // QEMU took the snapshot although we did not hear back: undo it as a commit would.
  const failures: string[] = [];
  for (const overlay of active) await commitOverlay(qmp, overlay).catch((commitError: unknown) => failures.push((commitError as Error).message));
  if (failures.length > 0) {
    throw new SnapshiftError('VM_SNAPSHOT_FAILED', `the VM snapshot failed (${why}) after QEMU had taken it, and committing it failed (${failures[0]}): run "snapshift hunt"`, { cause: error });
  }
  await Promise.all(overlays.map((overlay) => rm(overlay.overlayPath, { force: true })));
  ledger.clear(ledgerEntryId);
  throw new SnapshiftError('VM_SNAPSHOT_FAILED', `the VM snapshot failed (${why}) after QEMU had taken it, so it was committed at once`, { cause: error });
}
