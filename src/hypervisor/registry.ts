import type { HostKind, HostRecord, VmTarget } from '../catalog/catalog.ts';
import { SnapshiftError } from '../core/errors.ts';
import type { Hypervisor, HypervisorVm } from './hypervisor.ts';
import { libvirtHypervisor } from './libvirt/libvirt-hypervisor.ts';
import { qemuHypervisor } from './qemu/qemu-hypervisor.ts';

/** Every hypervisor adapter, by host kind: adding one is one line here and its own folder. */
const hypervisors: Record<string, Hypervisor> = {
  qemu: qemuHypervisor,
  libvirt: libvirtHypervisor,
};

export function hostKinds(): HostKind[] {
  return Object.keys(hypervisors) as HostKind[];
}

export function hypervisorFor(host: Pick<HostRecord, 'kind' | 'name'>): Hypervisor {
  const hypervisor = hypervisors[host.kind];
  if (!hypervisor) throw new SnapshiftError('HOST_KIND_UNKNOWN', `host ${host.name} is of kind "${host.kind}", which this snapshift has no adapter for (${hostKinds().join(', ')})`);
  return hypervisor;
}

/** Opens a VM for a task through its host's adapter. */
export function openVm(vm: VmTarget, options?: { timeoutMs?: number }): Promise<HypervisorVm> {
  return hypervisorFor(vm.host).openVm(vm, options);
}
