import type { HostRecord, LibvirtHostRecord, VmSnapshotLedgerEntry, VmTarget } from '../../catalog/catalog.ts';
import { SnapshiftError } from '../../core/errors.ts';
import { exportImageReadOnly } from '../../datamover/image-exporter.ts';
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
import { planLibvirtChangedBlocks } from './libvirt-cbt.ts';
import { listLibvirtDisks } from './libvirt-disks.ts';
import { startLibvirtFleecing } from './libvirt-fleece.ts';
import { huntLibvirtHost, repairLibvirtLedgerEntry } from './libvirt-hunter.ts';
import { planLibvirtQuiesce } from './libvirt-quiesce.ts';
import { takeLibvirtVmSnapshot } from './libvirt-vm-snapshot.ts';
import { Virsh } from './virsh.ts';

/**
 * The libvirt adapter: a host is a libvirt daemon (its connection URI), serving many VMs (domains), reached
 * through virsh (docs/NOTES.md, "Talking to libvirt: why virsh"). A VM's `ref` is its domain name.
 */
export const libvirtHypervisor: Hypervisor = {
  kind: 'libvirt',

  async listVms(host: HostRecord) {
    const virsh = new Virsh(libvirtAddressOf(host).uri, { timeoutMs: 30_000 });
    return (await virsh.listDomains()).map((domain) => ({ ref: domain.name, uuid: domain.uuid, state: domain.state }));
  },

  async openVm(vm: VmTarget, options: { timeoutMs?: number } = {}): Promise<HypervisorVm> {
    const virsh = new Virsh(libvirtAddressOf(vm.host).uri);
    const domain = await virsh.domain(vm.ref, { timeoutMs: options.timeoutMs ?? 10_000 });
    if (vm.uuid !== null && domain.uuid.toLowerCase() !== vm.uuid.toLowerCase()) {
      throw new SnapshiftError(
        'VM_UUID_MISMATCH',
        `domain ${vm.ref} on host ${vm.host.name} has UUID ${domain.uuid}, but VM ${vm.name} was registered with UUID ${vm.uuid}: another VM took its name? Check it, then register it again`,
      );
    }
    return new LibvirtVm(vm.name, virsh, domain.name, domain.uuid);
  },

  repairLedgerEntry(entry: VmSnapshotLedgerEntry, host: HostRecord | undefined, options: HuntOptions): Promise<HuntAction[]> {
    // The row carries the URI itself: a removed host's leftovers are still repaired.
    const uri = host?.kind === 'libvirt' ? host.uri : typeof entry.adapter?.['uri'] === 'string' ? entry.adapter['uri'] : undefined;
    if (uri === undefined) throw new SnapshiftError('LEDGER_ENTRY_BAD', `ledger row ${entry.id} of ${entry.vmName} names no libvirt URI and its host is gone`);
    return repairLibvirtLedgerEntry(new Virsh(uri, { timeoutMs: 60_000 }), entry, options);
  },

  huntHost(host: HostRecord, options: HuntOptions): Promise<HuntAction[]> {
    return huntLibvirtHost(new Virsh(libvirtAddressOf(host).uri, { timeoutMs: 30_000 }), options);
  },
};

function libvirtAddressOf(host: HostRecord): LibvirtHostRecord {
  if (host.kind !== 'libvirt') throw new SnapshiftError('HOST_KIND_UNKNOWN', `host ${host.name} is a ${host.kind} host, not a libvirt one`);
  return host;
}

/** One libvirt domain for a task. virsh holds no connection between calls: disposing has nothing to close. */
class LibvirtVm implements HypervisorVm {
  constructor(
    readonly name: string,
    private readonly virsh: Virsh,
    private readonly domainName: string,
    private readonly uuid: string,
  ) {}

  listDisks(): Promise<VmDisk[]> {
    return listLibvirtDisks(this.virsh, this.domainName);
  }

  async captureConfiguration(): Promise<VmConfiguration> {
    // The definition (not this run's state: aliases, runtime paths), so `virsh define` takes it back.
    return { kind: 'libvirt', uuid: this.uuid, domainXml: await this.virsh.domainXml(this.domainName, { inactive: true, migratable: true }) };
  }

  prepareQuiesce(wanted: boolean): Promise<QuiescePlan> {
    return planLibvirtQuiesce(this.virsh, this.domainName, wanted);
  }

  async planChangedBlocks(disks: readonly VmDisk[], input: CbtPlanInput): Promise<VmCbtPlan> {
    return planLibvirtChangedBlocks(this.virsh, await this.#domain(), disks, input);
  }

  async snapshot(disks: readonly VmDisk[], options: VmSnapshotOptions): Promise<VmSnapshot> {
    return takeLibvirtVmSnapshot(this.virsh, await this.#domain(), disks, options);
  }

  /**
   * libvirt has no export of a backing image: the frozen base is served read-only by a qemu-storage-daemon of
   * ours, without image locks (the VM's QEMU holds the base as its backing file, and writes it at commit).
   */
  exportFrozenDisk(disk: VmDisk, index: number, options: { tag: string; runDir: string }): Promise<DiskExport> {
    return exportImageReadOnly({ imagePath: disk.imagePath, format: disk.format, runDir: options.runDir, exportName: `snapshift-${options.tag}-${index}`, forceShare: true });
  }

  async startFleecing(disks: readonly VmDisk[], options: FleeceOptions): Promise<Fleece> {
    return startLibvirtFleecing(this.virsh, await this.#domain(), disks, options);
  }

  async #domain(): Promise<{ name: string; uuid: string; allTargets: string[] }> {
    const disks = await this.virsh.disks(this.domainName);
    return { name: this.domainName, uuid: this.uuid, allTargets: disks.map((disk) => disk.target) };
  }

  async [Symbol.asyncDispose](): Promise<void> {}
}
