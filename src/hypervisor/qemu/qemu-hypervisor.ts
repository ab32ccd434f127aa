import { join } from 'node:path';
import type { HostRecord, QemuHostRecord, VmSnapshotLedgerEntry, VmTarget } from '../../catalog/catalog.ts';
import { SnapshiftError } from '../../core/errors.ts';
import { socketSafe } from '../../core/socket-name.ts';
import type {
  CbtPlanInput,
  DiskExport,
  Fleece,
  FleeceOptions,
  HuntAction,
  HuntOptions,
  Hypervisor,
  HypervisorVm,
  QuiescePlan,
  VmCbtPlan,
  VmConfiguration,
  VmDisk,
  VmSnapshot,
  VmSnapshotOptions,
} from '../hypervisor.ts';
import { captureQemuConfiguration } from './qemu-configuration.ts';
import { isQemuCbtPlan, planQemuChangedBlocks } from './qemu-cbt.ts';
import { huntQemuHost, repairQemuLedgerEntry } from './qemu-hunter.ts';
import { startQemuFleecing } from './qemu-fleecing.ts';
import { exportNodeReadOnly } from './qemu-nbd-export.ts';
import { planQemuQuiesce } from './qemu-quiesce.ts';
import { listQemuDisks } from './qemu-vm.ts';
import { takeQemuVmSnapshot } from './qemu-vm-snapshot.ts';
import { connectQmp } from './qmp-connect.ts';
import type { QmpSession } from './qmp-session.ts';

/** The QEMU adapter: a host is one QEMU process (a VM, or qemu-storage-daemon standing in for one) and its QMP socket. */
export const qemuHypervisor: Hypervisor = {
  kind: 'qemu',

  async listVms(host: HostRecord) {
    const address = qemuAddressOf(host);
    await using qmp = await connectQmp(host.name, address.qmpSocketPath, 5_000);
    return [{ ref: host.name, uuid: await queryUuid(qmp), state: (await queryRunState(qmp)) ?? 'running' }];
  },

  async openVm(vm: VmTarget, options: { timeoutMs?: number } = {}): Promise<HypervisorVm> {
    const address = qemuAddressOf(vm.host);
    return new QemuVm(vm.name, address, await connectQmp(vm.name, address.qmpSocketPath, options.timeoutMs ?? 10_000));
  },

  repairLedgerEntry(entry: VmSnapshotLedgerEntry, _host: HostRecord | undefined, options: HuntOptions): Promise<HuntAction[]> {
    // The row carries the QMP socket itself: a removed host's leftovers are still repaired.
    return repairQemuLedgerEntry(entry, options);
  },

  huntHost(host: HostRecord, options: HuntOptions): Promise<HuntAction[]> {
    return huntQemuHost(host.name, qemuAddressOf(host).qmpSocketPath, options);
  },
};

function qemuAddressOf(host: HostRecord): QemuHostRecord {
  if (host.kind !== 'qemu') throw new SnapshiftError('HOST_KIND_UNKNOWN', `host ${host.name} is a ${host.kind} host, not a qemu one`);
  return host;
}

/**
 * One QEMU VM for a task. QEMU serves one QMP client at a time, so the connection is held only while the task
 * needs it (disposed with the VM).
 */
class QemuVm implements HypervisorVm {
  constructor(
    readonly name: string,
    private readonly address: QemuHostRecord,
    private readonly qmp: QmpSession,
  ) {}

  listDisks(): Promise<VmDisk[]> {
    return listQemuDisks(this.qmp);
  }

  async captureConfiguration(): Promise<VmConfiguration> {
    return captureQemuConfiguration(this.qmp, await this.listDisks(), await queryUuid(this.qmp));
  }

  prepareQuiesce(wanted: boolean): Promise<QuiescePlan> {
    return planQemuQuiesce(this.address.qgaSocketPath, wanted);
  }

  planChangedBlocks(disks: readonly VmDisk[], input: CbtPlanInput): Promise<VmCbtPlan> {
    // The bitmap lives in the VM, so its block status comes from the VM's own export even when the data comes
    // from a storage snapshot.
    return planQemuChangedBlocks(this.qmp, this.name, disks, {
      ...input,
      exportWithBitmap: (disk, index, bitmap) => this.#export(disk.nodeName, `snapshift-${input.tag}-bitmap-${index}`, input.runDir, [bitmap]),
    });
  }

  snapshot(disks: readonly VmDisk[], options: VmSnapshotOptions): Promise<VmSnapshot> {
    return takeQemuVmSnapshot(this.qmp, disks, {
      vmName: this.name,
      tag: options.tag,
      ledger: options.ledger,
      overlayFolder: options.overlayFolder,
      quiesce: options.quiesce,
      dirtyBitmaps: isQemuCbtPlan(options.cbt) ? options.cbt.rotations : [],
    });
  }

  exportFrozenDisk(disk: VmDisk, index: number, options: { tag: string; runDir: string }): Promise<DiskExport> {
    return this.#export(disk.nodeName, `snapshift-${options.tag}-${index}`, options.runDir);
  }

  /**
   * Fleecing through blockdev-backup's copy-before-write filter (qemu-fleecing.ts). The ledger row lists the
   * scratch images as its overlays (so a hunt that fails keeps the row) and carries in `adapter` what the
   * hunter removes: `{ fleecing: true, tag, scratch }` (fleecing-hunter.ts); it never commits them.
   */
  startFleecing(disks: readonly VmDisk[], options: FleeceOptions): Promise<Fleece> {
    const { tag } = options;
    return startQemuFleecing(this.qmp, disks, {
      tag,
      scratchFolder: options.scratchFolder,
      // The fleecing instant is where the new tracking starts: the rotations go into its transaction.
      dirtyBitmaps: isQemuCbtPlan(options.cbt) ? options.cbt.rotations : [],
      quiesce: options.quiesce,
      nbdServerSocketPath: this.address.nbdSocketPath,
      exportSocketPath: this.#nbdSocketPath(options.runDir),
      ledger: {
        recordIntent: (scratch) =>
          options.ledger.recordIntent(
            scratch.map((entry) => ({ diskName: entry.diskName, baseNodeName: entry.nodeName, overlayNodeName: entry.scratchNodeName, overlayPath: entry.scratchPath })),
            { fleecing: true, tag, scratch },
          ),
        clear: (entryId) => options.ledger.clear(entryId),
      },
    });
  }

  #nbdSocketPath(runDir: string): string {
    return join(runDir, `nbd-${socketSafe(this.name)}.sock`);
  }

  #export(nodeName: string, exportName: string, runDir: string, bitmaps?: string[]): Promise<DiskExport> {
    return exportNodeReadOnly(this.qmp, nodeName, {
      exportName,
      socketPath: this.#nbdSocketPath(runDir),
      existingServerSocketPath: this.address.nbdSocketPath,
      ...(bitmaps ? { bitmaps } : {}),
    });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.qmp.close();
  }
}

async function queryUuid(qmp: QmpSession): Promise<string | null> {
  try {
    const { UUID } = await qmp.execute<{ UUID: string }>('query-uuid');
    // QEMU answers the nil UUID when started without -uuid: no identity worth keeping.
    return /^0{8}-0{4}-0{4}-0{4}-0{12}$/.test(UUID) ? null : UUID;
  } catch {
    return null; // qemu-storage-daemon
  }
}

async function queryRunState(qmp: QmpSession): Promise<string | undefined> {
  try {
    return (await qmp.execute<{ status: string }>('query-status')).status;
  } catch {
    return undefined;
  }
}
