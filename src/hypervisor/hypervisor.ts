import type { HostKind, HostRecord, VmSnapshotLedgerEntry, VmTarget } from '../catalog/catalog.ts';
import type { DiskReadPlan } from '../datamover/changed-blocks.ts';

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

/** Guest file-system freeze around a VM snapshot (crash- vs. application-consistent). */
export interface QuiesceHooks {
  freeze(): Promise<void>;
  thaw(): Promise<void>;
}

/** Quiescing as planned for one task: hooks when the guest agent answers, and the note the session shows. */
export interface QuiescePlan extends AsyncDisposable {
  quiesce?: QuiesceHooks;
  /** What the session tells the admin; null when quiescing was not asked for. */
  note: string | null;
}

/** The ledger as an adapter sees it: the intent is recorded before the hypervisor is asked, cleared after. */
export interface SnapshotLedger {
  /** `adapter`: whatever else the adapter's hunter needs to find and undo the snapshot after a crash. */
  recordIntent(overlays: readonly VmSnapshotOverlay[], adapter?: Record<string, unknown>): number;
  clear(entryId: number): void;
}

export interface VmSnapshotOptions {
  /** Session tag in every name we create, so a crash's leftovers are recognisable: `snapshift-<tag>-…`. */
  tag: string;
  ledger: SnapshotLedger;
  /** Where overlays of non-file disks go (RBD, iSCSI); file disks always get theirs beside the image. */
  overlayFolder?: string;
  quiesce?: QuiesceHooks;
  /** The task's changed-block tracking plan (from the same VM's `planChangedBlocks`): its cut is the snapshot's. */
  cbt?: VmCbtPlan;
}

/** What changed-block tracking needs from the repository side, without the adapter reading the repository. */
export interface CbtPlanInput {
  /** The VM's latest restore point in the target repository (unchanged chunks are inherited from it). */
  latest: { id: string; extra: Record<string, unknown> } | undefined;
  /** Distinguishes this repository's tracking state (bitmaps, checkpoints) from another repository's. */
  chainKey: string;
  /** Session tag: names of new tracking state carry it. */
  tag: string;
  /** Read every disk in full even where tracking is sound (`backup --full`); new tracking still starts. */
  full?: boolean;
  /** Folder for sockets of exports the plan opens. */
  runDir: string;
}

/**
 * Changed-block tracking for one VM task: decides per disk whether the previous restore point's tracking can be
 * trusted, starts new tracking at the VM snapshot's (or fleecing's) instant, and afterwards keeps or undoes it.
 */
export interface VmCbtPlan {
  readonly baseRestorePointId: string | undefined;
  /** How each disk (by name) is read. */
  readonly readPlans: ReadonlyMap<string, DiskReadPlan>;
  /** Stored as `extra.cbt` of the restore point: what the next backup needs to trust (or distrust) it. */
  readonly record: object;
  /**
   * After the restore point is written (true) or not (false): never loses a write between restore points.
   * Never throws: what it could not clean up comes back as warnings for the task's record.
   */
  finish(succeeded: boolean): Promise<string[]>;
}

/** Figures a fleecing reports once released: what it cost. */
export interface FleeceStats {
  lifetimeMs: number;
  /** Old blocks the guest's writes copied aside while it lived. */
  scratchBytes: number;
}

/**
 * Fleecing (copy-before-write): the VM's point in time read while the guest writes on, with no delta file and
 * no commit; the guest's writes first copy old blocks to a scratch image. Disposing releases it.
 */
export interface Fleece extends AsyncDisposable {
  readonly takenAt: Date;
  /** A read-only NBD export of one disk at the point in time. */
  exportDisk(disk: VmDisk, index: number): Promise<DiskExport>;
  /** Ends the fleecing (idempotent) and removes its scratch images. */
  release(): Promise<FleeceStats>;
  /**
   * Throws when the fleecing no longer holds the point in time (its scratch filled up or failed, so a guest
   * write went through unsaved): what was read is then not one instant. Called after the copy, before release.
   * Also when the hypervisor ended it behind our back, or the adapter gave it up so the guest could keep
   * writing (scratch space low). Adapters whose point in time cannot be lost omit it.
   */
  verifyIntact?(): Promise<void>;
}

export interface FleeceOptions {
  tag: string;
  ledger: SnapshotLedger;
  /** Folder for scratch images when they cannot go beside the disk (default: beside each image). */
  scratchFolder?: string;
  runDir: string;
  quiesce?: QuiesceHooks;
  cbt?: VmCbtPlan;
}

/** The VM's configuration, captured with each restore point for a later VM restore (docs/FORMAT.md). */
export type VmConfiguration = QemuVmConfiguration | LibvirtVmConfiguration;

/**
 * A plain QEMU VM as QMP describes it. Restore points written before issue 13 hold only kind, uuid, machine,
 * cpuCount, memoryBytes and disks (name, format, size): readers treat the other fields as absent.
 */
export interface QemuVmConfiguration {
  kind: 'qemu';
  uuid: string | null;
  /** Machine type, e.g. "pc-i440fx-7.2". */
  machine: string | null;
  accelerator?: 'kvm' | 'tcg' | null;
  /** CPU model, e.g. "max" or "host". */
  cpuModel?: string | null;
  cpuCount: number | null;
  memoryBytes: number | null;
  /** A kernel QEMU booted directly (-kernel/-initrd/-append); null when the guest boots from its disks. */
  directBoot?: { kernel: string; initrd: string; append: string } | null;
  /** In guest order; `device` is the qdev model (virtio-blk-pci, scsi-hd, …) when QEMU names one. */
  disks: Array<{ name: string; format: string; virtualSizeBytes: number; device?: string | null }>;
  nics?: Array<{ id: string | null; model: string; mac: string }>;
  /** Serial ports by index and what their back-end was (a file, a unix socket, a pty, nothing). */
  serials?: Array<{ index: number; backend: 'file' | 'unix-socket' | 'pty' | 'none'; path: string | null }>;
  /** A virtio-serial channel org.qemu.guest_agent.0. */
  guestAgent?: boolean;
}

/** A libvirt domain: its inactive, migratable definition. */
export interface LibvirtVmConfiguration {
  kind: 'libvirt';
  uuid: string;
  domainXml: string;
}

/** One VM opened for a task through its host's adapter; holds what the task needs until disposed. */
export interface HypervisorVm extends AsyncDisposable {
  readonly name: string;
  listDisks(): Promise<VmDisk[]>;
  captureConfiguration(): Promise<VmConfiguration>;
  prepareQuiesce(wanted: boolean): Promise<QuiescePlan>;
  /** Must run before the VM snapshot or fleecing (whose instant starts the new tracking). */
  planChangedBlocks(disks: readonly VmDisk[], input: CbtPlanInput): Promise<VmCbtPlan>;
  /** A crash-consistent (or, with `quiesce`, app-consistent) VM snapshot of all disks at one instant. */
  snapshot(disks: readonly VmDisk[], options: VmSnapshotOptions): Promise<VmSnapshot>;
  /** A read-only export of a disk's frozen base while a VM snapshot of this VM lives (regular mode). */
  exportFrozenDisk(disk: VmDisk, index: number, options: { tag: string; runDir: string }): Promise<DiskExport>;
  /** Starts fleecing of all disks at one instant (third processing mode). */
  startFleecing(disks: readonly VmDisk[], options: FleeceOptions): Promise<Fleece>;
}

/** What a hunter did (or, in a dry run, would do) about one leftover. */
export interface HuntAction {
  vmName: string;
  overlayPath: string;
  action: 'committed-live' | 'committed-offline' | 'removed-unused-file' | 'removed-export' | 'removed-fleecing' | 'removed-checkpoint' | 'already-gone' | 'left-in-place';
  detail: string;
}

export interface HuntOptions {
  dryRun: boolean;
  /** True for session tags whose task still runs: what carries them is not ours to touch. */
  isLiveTag: (tag: string) => boolean;
}

/** One hypervisor adapter: how snapshift reaches VMs on one kind of host (src/hypervisor/registry.ts). */
export interface Hypervisor {
  readonly kind: HostKind;
  /** The VMs the host serves, with their stable identity; throws when the host does not answer. */
  listVms(host: HostRecord): Promise<Array<{ ref: string; uuid: string | null; state: string }>>;
  /** Opens a VM for a task; `timeoutMs` bounds reaching the host. */
  openVm(vm: VmTarget, options?: { timeoutMs?: number }): Promise<HypervisorVm>;
  /**
   * Undoes a VM snapshot a crashed task left (a ledger row of this kind whose owner is gone): commits the
   * overlays live, or offline when the VM is gone. `host` is undefined when it was removed from the catalog.
   */
  repairLedgerEntry(entry: VmSnapshotLedgerEntry, host: HostRecord | undefined, options: HuntOptions): Promise<HuntAction[]>;
  /** Our named leftovers on a host that no ledger row names (exports, overlays, fleecing jobs). */
  huntHost(host: HostRecord, options: HuntOptions): Promise<HuntAction[]>;
}
