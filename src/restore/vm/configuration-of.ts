import { XMLParser } from 'fast-xml-parser';
import { SnapshiftError } from '../../core/errors.ts';
import type { LibvirtVmConfiguration, QemuVmConfiguration, VmConfiguration } from '../../hypervisor/hypervisor.ts';
import type { RestorePointSummary } from '../../repository/index.ts';

/** The VM configuration a restore point carries (docs/FORMAT.md, `extra.vmConfiguration`). */
export function configurationOf(summary: RestorePointSummary): VmConfiguration {
  const configuration = summary.extra.vmConfiguration as VmConfiguration | undefined;
  if (!configuration || (configuration.kind !== 'qemu' && configuration.kind !== 'libvirt')) {
    throw new SnapshiftError(
      'RESTORE_NO_CONFIGURATION',
      `restore point ${summary.id} of ${summary.vmName} holds no VM configuration (it predates VM restore); restore its disks with "snapshift restore ${summary.vmName} --point ${summary.id} --to DIR" and define the VM by hand`,
    );
  }
  return configuration;
}

/**
 * The configuration as plain QEMU needs it to start the VM: a QEMU one as it is; a libvirt domain read from
 * its XML (memory, vCPUs, machine, a directly booted kernel, disks in order, NICs, serial ports, the guest
 * agent channel), for instant recovery and boot verification, which run the VM under QEMU directly.
 */
export function qemuConfigurationOf(summary: RestorePointSummary): QemuVmConfiguration {
  const configuration = configurationOf(summary);
  if (configuration.kind === 'qemu') return configuration;
  return qemuConfigurationFromDomain(configuration, summary);
}

type XmlNode = Record<string, unknown>;
const parser = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@', textNodeName: '#text', isArray: (name) => ['disk', 'interface', 'serial', 'channel'].includes(name) });

function qemuConfigurationFromDomain(configuration: LibvirtVmConfiguration, summary: RestorePointSummary): QemuVmConfiguration {
  const domain = (parser.parse(configuration.domainXml) as { domain?: XmlNode }).domain;
  if (!domain) throw new SnapshiftError('RESTORE_NO_CONFIGURATION', `the domain XML in restore point ${summary.id} has no <domain>`);
  const node = (value: unknown): XmlNode | undefined => (value && typeof value === 'object' ? (value as XmlNode) : undefined);
  const text = (value: unknown): string | undefined => (typeof value === 'string' || typeof value === 'number' ? String(value) : (node(value)?.['#text'] as string | undefined));
  const list = (value: unknown): XmlNode[] => (Array.isArray(value) ? (value as XmlNode[]) : []);
  const os = node(domain.os);
  const devices = node(domain.devices) ?? {};
  const memory = node(domain.memory) ?? { '#text': text(domain.memory) };
  const memoryUnit = String(memory['@unit'] ?? 'KiB');
  const unitBytes: Record<string, number> = { b: 1, bytes: 1, KiB: 1024, k: 1024, MiB: 1024 ** 2, M: 1024 ** 2, GiB: 1024 ** 3, G: 1024 ** 3 };
  const disksByTarget = new Map(summary.disks.map((disk) => [disk.name, disk]));
  const diskDevices = list(devices.disk).filter((disk) => (disk['@device'] ?? 'disk') === 'disk');
  const kernel = text(os?.kernel);
  const cpu = node(domain.cpu);
  return {
    kind: 'qemu',
    uuid: configuration.uuid,
    machine: (node(os?.type)?.['@machine'] as string | undefined) ?? null,
    accelerator: domain['@type'] === 'kvm' ? 'kvm' : 'tcg',
    cpuModel: cpu?.['@mode'] === 'host-passthrough' ? 'host' : 'max',
    cpuCount: Number(text(domain.vcpu) ?? 1),
    memoryBytes: Number(text(memory) ?? 0) * (unitBytes[memoryUnit] ?? 1024),
    directBoot: kernel ? { kernel, initrd: text(os?.initrd) ?? '', append: text(os?.cmdline) ?? '' } : null,
    disks: diskDevices.map((disk) => {
      const target = String(node(disk.target)?.['@dev'] ?? '');
      const bus = node(disk.target)?.['@bus'];
      return {
        name: target,
        format: String(node(disk.driver)?.['@type'] ?? 'raw'),
        virtualSizeBytes: disksByTarget.get(target)?.sizeBytes ?? 0,
        device: bus === 'virtio' || bus === undefined ? 'virtio-blk-pci' : bus === 'scsi' ? 'scsi-hd' : 'ide-hd',
      };
    }),
    nics: list(devices.interface).map((nic) => ({
      id: null,
      model: node(nic.model)?.['@type'] === 'virtio' || !nic.model ? 'virtio-net-pci' : String(node(nic.model)?.['@type']),
      mac: String(node(nic.mac)?.['@address'] ?? ''),
    })),
    serials: list(devices.serial).map((serial, index) => ({
      index: Number(node(serial.target)?.['@port'] ?? index),
      backend: serial['@type'] === 'file' ? 'file' : serial['@type'] === 'unix' ? 'unix-socket' : serial['@type'] === 'pty' ? 'pty' : 'none',
      path: (node(serial.source)?.['@path'] as string | undefined) ?? null,
    })),
    guestAgent: list(devices.channel).some((channel) => node(channel.target)?.['@name'] === 'org.qemu.guest_agent.0'),
  };
}
