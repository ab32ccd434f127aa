import { SnapshiftError } from '../../core/errors.ts';
import type { DiskExport, VmDisk, VmSnapshot } from '../hypervisor.ts';
import { QmpClient } from './qmp-client.ts';
import { listQemuDisks } from './qemu-vm.ts';
import { takeQemuVmSnapshot, type TakeVmSnapshotOptions } from './qemu-vm-snapshot.ts';
import { exportNodeReadOnly } from './qemu-nbd-export.ts';
import type { QmpSession } from './qmp-session.ts';

export interface QemuHostAddress {
  name: string;
  qmpSocketPath: string;
  nbdSocketPath?: string | null;
}

/**
 * One QEMU process (a VM, or qemu-storage-daemon standing in for one) reached through its QMP socket.
 * QEMU serves one QMP client at a time, so a host holds its connection only while a task needs it.
 */
export class QemuHost implements AsyncDisposable {
  private constructor(
    readonly address: QemuHostAddress,
    readonly qmp: QmpSession,
  ) {}

  static async connect(address: QemuHostAddress, timeoutMs = 10_000): Promise<QemuHost> {
    try {
      return new QemuHost(address, await QmpClient.connect(address.qmpSocketPath, { timeoutMs }));
    } catch (error) {
      const code = error instanceof SnapshiftError ? error.code : 'QMP_CONNECT_FAILED';
      throw new SnapshiftError(code, `VM ${address.name}: ${(error as Error).message}`, { cause: error });
    }
  }

  listDisks(): Promise<VmDisk[]> {
    return listQemuDisks(this.qmp);
  }

  snapshot(disks: readonly VmDisk[], options: TakeVmSnapshotOptions): Promise<VmSnapshot> {
    return takeQemuVmSnapshot(this.qmp, disks, options);
  }

  exportReadOnly(nodeName: string, options: { exportName: string; socketPath: string; bitmaps?: string[] }): Promise<DiskExport> {
    return exportNodeReadOnly(this.qmp, nodeName, { ...options, existingServerSocketPath: this.address.nbdSocketPath });
  }

  async close(): Promise<void> {
    await this.qmp.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
