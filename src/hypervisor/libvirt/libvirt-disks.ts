import type { VmDisk } from '../hypervisor.ts';
import type { LibvirtDisk } from './libvirt-xml.ts';
import type { CallOptions, Virsh } from './virsh.ts';

/** Disks we back up: writable block devices with an image (not CD-ROMs, floppies, read-only or empty disks). */
export function isProtectedDisk(disk: LibvirtDisk): boolean {
  return disk.device === 'disk' && !disk.readOnly && disk.path !== undefined;
}

/** The protocol layer as the adapters name it: a file, a host block device, or a network protocol (`rbd`). */
export function protocolOf(disk: LibvirtDisk): string {
  if (disk.type === 'block') return 'host_device';
  if (disk.type === 'network') return disk.path?.split(':')[0] ?? 'network';
  return 'file';
}

/** The domain's protected disks from its live XML, sizes from `domblkinfo`; the target dev names each. */
export async function listLibvirtDisks(virsh: Virsh, domain: string, options: CallOptions = {}): Promise<VmDisk[]> {
  const disks: VmDisk[] = [];
  for (const disk of (await virsh.disks(domain, options)).filter(isProtectedDisk)) {
    const info = await virsh.blockInfo(domain, disk.target, options);
    disks.push({
      name: disk.target,
      // libvirt addresses every disk operation by target dev: it is the adapter's node name as well.
      nodeName: disk.target,
      imagePath: disk.path!,
      format: disk.format ?? 'raw',
      protocol: protocolOf(disk),
      virtualSizeBytes: info.capacityBytes,
      actualSizeBytes: info.allocationBytes,
    });
  }
  return disks;
}
