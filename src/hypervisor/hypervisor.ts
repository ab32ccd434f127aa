/** One block device of a VM, as the hypervisor sees it. */
export interface VmDisk {
  /** Stable name within the VM: the qdev id (`vda`) for a VM, the node name for a storage daemon. */
  readonly name: string;
  /** The format node the device reads through (the active layer). */
  readonly nodeName: string;
  /** Path or URL of the image file (`/vms/vm1.qcow2`, `rbd:pool/img`). */
  readonly imagePath: string;
  readonly format: string;
  /** Driver of the protocol layer under the format node: 'file', 'rbd', 'iscsi', … */
  readonly protocol: string;
  readonly virtualSizeBytes: number;
  /** Bytes the image occupies on its storage, when the hypervisor knows. */
  readonly actualSizeBytes: number | undefined;
}

/** One overlay of a VM snapshot: the delta file that takes the guest's writes while the snapshot lives. */
export interface VmSnapshotOverlay {
  readonly diskName: string;
  readonly baseNodeName: string;
  readonly overlayNodeName: string;
  readonly overlayPath: string;
}

/** Figures a VM snapshot reports once committed: what it cost the guest. */
export interface VmSnapshotStats {
  lifetimeMs: number;
  deltaBytesAtCommit: number;
  commitMs: number;
}

/**
 * A VM snapshot: the disks' base layers are read-only while it lives. Disposing commits the delta back and
 * removes the overlays, so `await using` guarantees the guest is never left on a snapshot.
 */
export interface VmSnapshot extends AsyncDisposable {
  readonly overlays: readonly VmSnapshotOverlay[];
  readonly takenAt: Date;
  /** Commits and removes the snapshot now (idempotent); later disposal is a no-op. */
  commit(): Promise<VmSnapshotStats>;
  readonly committed: boolean;
}

/** A read-only NBD export of one disk's frozen base; removed when disposed. */
export interface DiskExport extends AsyncDisposable {
  readonly socketPath: string;
  readonly exportName: string;
}
