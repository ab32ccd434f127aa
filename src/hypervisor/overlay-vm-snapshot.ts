import { stat } from 'node:fs/promises';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import type { SnapshotLedger, VmDisk, VmSnapshot, VmSnapshotOverlay, VmSnapshotStats } from './hypervisor.ts';

const snapshottableFormats = new Set(['qcow2', 'raw']);
const snapshottableProtocols = new Set(['file', 'host_device']);

/** Refuses, before anything is touched, disks an external qcow2 overlay cannot sit on. */
export function assertSnapshottable(disks: readonly VmDisk[], overlayFolder?: string): void {
  for (const disk of disks) {
    if (!snapshottableFormats.has(disk.format)) {
      throw new SnapshiftError('DISK_FORMAT_UNSUPPORTED', `disk ${disk.name} (${disk.imagePath}) is ${disk.format}: only qcow2 and raw disks can be snapshotted; the VM was not touched`);
    }
    if (!snapshottableProtocols.has(disk.protocol) && overlayFolder === undefined) {
      throw new SnapshiftError('DISK_FORMAT_UNSUPPORTED', `disk ${disk.name} is on ${disk.protocol} (${disk.imagePath}): its overlay needs a local folder (--overlay-folder); the VM was not touched`);
    }
  }
}

/** Where an overlay of non-file disks may go: they need a local folder (see `assertSnapshottable`). */
export function isFileProtocol(protocol: string): boolean {
  return snapshottableProtocols.has(protocol);
}

/** Bytes a file occupies on its storage (0 when gone): a delta's or a scratch image's real size. */
export async function allocatedBytes(path: string): Promise<number> {
  try {
    return (await stat(path)).blocks * 512;
  } catch {
    return 0;
  }
}

/**
 * A VM snapshot made of one external overlay per disk, as every adapter takes it today (QEMU, libvirt):
 * committing merges each overlay back with the adapter's `commitOverlay` (which also removes the overlay file)
 * and clears the ledger row once all are gone. Idempotent; disposal commits, so a failed task never leaves the
 * guest on its overlays.
 */
export class OverlayVmSnapshot implements VmSnapshot {
  readonly takenAt = new Date();
  readonly #startedAt = performance.now();
  #commit: Promise<VmSnapshotStats> | undefined;

  constructor(
    /** For messages: `the VM snapshot of <vmName>`. */
    private readonly vmName: string,
    readonly overlays: readonly VmSnapshotOverlay[],
    private readonly ledger: SnapshotLedger,
    private readonly ledgerEntryId: number,
    private readonly commitOverlay: (overlay: VmSnapshotOverlay) => Promise<void>,
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
    // Every disk even if one fails, so as few overlays as possible stay behind; the ledger row stays (for the
    // hunter) until all are gone.
    const failures: unknown[] = [];
    for (const overlay of this.overlays) {
      try {
        await this.commitOverlay(overlay);
      } catch (error) {
        failures.push(error);
      }
    }
    const commitMs = performance.now() - commitStartedAt;
    if (failures.length > 0) {
      throw new SnapshiftError('VM_SNAPSHOT_COMMIT_FAILED', `could not commit the VM snapshot of ${this.vmName} (run "snapshift hunt" to retry): ${messageOf(failures[0])}`, { cause: failures[0] });
    }
    faultPoint('vm-snapshot.after-commit');
    this.ledger.clear(this.ledgerEntryId);
    return { lifetimeMs: performance.now() - this.#startedAt, deltaBytesAtCommit, commitMs };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.commit();
  }
}
