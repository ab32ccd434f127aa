// The lab's public surface, for tests, the demo and benchmarks (never the product's own path).
export { Lab, defaultDatastoreSizeBytes } from './lab.ts';
export type { LabUpOptions, LabDownOptions, LabDownReport, CreateVmOptions, StartVmOptions, LabStatus, LabZfs, ZfsUpOptions } from './lab.ts';
export { LabVm, vmProcessLabel } from './lab-vm.ts';
export type { GuestStopResult } from './lab-vm.ts';
export type { Heartbeat, GuestEvent } from './guest-console.ts';
export { parseGuestConsole } from './guest-console.ts';
export { LabLayout, datastoreKinds, defaultLabDir, isDatastoreKind } from './lab-layout.ts';
export type { DatastoreKind } from './lab-layout.ts';
export type { LabState, DatastoreRecord, ProcessRecord, VmRecord } from './lab-state.ts';
export { chooseAccelerator, guestBlockNames } from './qemu-guest.ts';
export type { Accelerator } from './qemu-guest.ts';
export { isOwnedProcessAlive, endOwnedProcess } from './owned-process.ts';
export { listLoopDevices, listMounts } from './host-inventory.ts';
export { parseByteSize, formatByteSize } from './byte-size.ts';
export { withLab, withZfs, labFor, useSharedTestCache } from './with-lab.ts';
export { zfsDaemonLabel } from './lab-zfs.ts';
export type { ZfsRecord } from './lab-zfs.ts';
export { LabCeph, cephConfPath, labCephPool } from './ceph.ts';
export type { CephUpOptions, CephStatus, CephDownReport } from './ceph.ts';
export { withCeph } from './with-ceph.ts';
export type { TestLabOptions } from './with-lab.ts';
// The guest-less disk (qemu-storage-daemon + NBD) is re-exported here once ./storage-daemon.ts lands.
export { LabLibvirt, libvirtSocketPath, libvirtUri } from './lab-libvirt.ts';
export type { LabLibvirtOptions, LabLibvirtStopReport } from './lab-libvirt.ts';
export { LabDomain, labDomainXml, labDomainFiles, labGuestBoot } from './lab-libvirt-domain.ts';
export type { LabDomainOptions, LabDomainDisk, LabGuestBoot } from './lab-libvirt-domain.ts';
