import { randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import type { LibvirtVmConfiguration, QemuVmConfiguration } from '../../hypervisor/hypervisor.ts';
import { Virsh } from '../../hypervisor/libvirt/virsh.ts';
import type { RestorePointReader } from '../../repository/index.ts';
import { restoreDisk } from '../disk-restore.ts';
import { vmRunFolder } from '../instant/recovery-state.ts';
import { configurationOf } from './configuration-of.ts';
import { restoredDomainXml } from './libvirt-domain-restore.ts';
import { imageNodes, launchFiles, launchQemu, qemuLaunchArgs, randomMac, writeLaunchUnit } from './qemu-launch.ts';

export interface RestoreVmOptions {
  reader: RestorePointReader;
  chunkSizeBytes: number;
  /** The datastore folder: the VM goes to `<datastore>/<name>/`. */
  datastore: string;
  name: string;
  /** New UUID and MACs: set when the VM is restored beside its original (another name). */
  newIdentity: boolean;
  start: boolean;
  home: string;
  /** The libvirt connection to define the domain on (a libvirt source); default the captured host's. */
  libvirtUri?: string;
  signal?: AbortSignal;
  onDiskProgress?: (disk: string, doneBytes: number, totalBytes: number) => void;
}

export interface RestoredVm {
  name: string;
  kind: 'qemu' | 'libvirt';
  folder: string;
  uuid: string;
  macs: string[];
  disks: Array<{ name: string; path: string; sizeBytes: number }>;
  /** QEMU: how to start it, and where its QMP socket will be. */
  launchUnit?: { launchJson: string; startScript: string; qmpSocketPath: string };
  /** libvirt: the defined domain's XML file and connection. */
  domain?: { xmlPath: string; uri: string };
  started: boolean;
  pid?: number;
}

/**
 * Re-creates a runnable VM from a restore point: its disks restored as qcow2 into `<datastore>/<name>/`, then
 * a libvirt domain defined from the captured XML (when the source was one) or a QEMU launch unit written
 * from the captured configuration; started at once with `start`. Nothing of the original is touched: a new
 * name brings a new UUID and MACs, and console files and sockets go to the VM's own folders.
 */
export async function restoreVm(options: RestoreVmOptions): Promise<RestoredVm> {
  const summary = options.reader.summary;
  const configuration = configurationOf(summary);
  const folder = join(options.datastore, options.name);
  if ((await fs.readdir(folder).catch(() => [])).length > 0) throw new SnapshiftError('RESTORE_TARGET_EXISTS', `${folder} exists and is not empty: choose another --name or datastore`);
  await fs.mkdir(folder, { recursive: true });
  const disks: RestoredVm['disks'] = [];
  try {
    for (const disk of summary.disks) {
      const path = join(folder, `${disk.name}.qcow2`);
      const result = await restoreDisk(options.reader, disk.name, path, {
        format: 'qcow2',
        force: false,
        chunkSizeBytes: options.chunkSizeBytes,
        ...(options.signal ? { signal: options.signal } : {}),
        onProgress: (done, total) => options.onDiskProgress?.(disk.name, done, total),
      });
      disks.push({ name: disk.name, path, sizeBytes: result.sizeBytes });
    }
    return configuration.kind === 'libvirt'
      ? await defineLibvirtDomain(configuration, options, folder, disks)
      : await writeQemuVm(configuration, options, folder, disks);
  } catch (error) {
    // Half a VM is no VM: what this restore wrote goes (the folder was empty or new).
    await fs.rm(folder, { recursive: true, force: true });
    throw error;
  }
}

async function writeQemuVm(configuration: QemuVmConfiguration, options: RestoreVmOptions, folder: string, disks: RestoredVm['disks']): Promise<RestoredVm> {
  const runDir = vmRunFolder(options.home, options.name);
  await fs.mkdir(runDir, { recursive: true, mode: 0o700 });
  const uuid = options.newIdentity || !configuration.uuid ? randomUUID() : configuration.uuid;
  const macs = (configuration.nics ?? []).map((nic) => (options.newIdentity ? randomMac() : nic.mac));
  const devices = new Map(configuration.disks.map((disk) => [disk.name, disk.device ?? null]));
  const args = qemuLaunchArgs({
    name: options.name,
    uuid,
    runDir,
    configuration,
    macs,
    network: 'user',
    disks: disks.map((disk) => ({ name: disk.name, device: devices.get(disk.name) ?? null, ...imageNodes(disk.name, disk.path, 'qcow2') })),
  });
  const unit = await writeLaunchUnit(folder, runDir, args);
  const restored: RestoredVm = { name: options.name, kind: 'qemu', folder, uuid, macs, disks, launchUnit: { ...unit, qmpSocketPath: launchFiles(runDir).qmpSocket }, started: false };
  if (!options.start) return restored;
  const { pid } = await launchQemu(runDir, args);
  return { ...restored, started: true, pid };
}

async function defineLibvirtDomain(configuration: LibvirtVmConfiguration, options: RestoreVmOptions, folder: string, disks: RestoredVm['disks']): Promise<RestoredVm> {
  const uri = options.libvirtUri;
  if (!uri) throw new SnapshiftError('USAGE', `restore point ${options.reader.summary.id} is of a libvirt domain: name the libvirt host to define it on (--host)`);
  const uuid = options.newIdentity ? randomUUID() : configuration.uuid;
  const { xml, macs } = restoredDomainXml(configuration.domainXml, {
    name: options.name,
    uuid,
    newMacs: options.newIdentity,
    disks: new Map(disks.map((disk) => [disk.name, { path: disk.path, format: 'qcow2' as const }])),
    folder,
  });
  const xmlPath = join(folder, 'domain.xml');
  await fs.writeFile(xmlPath, xml);
  const virsh = new Virsh(uri, { timeoutMs: 60_000 });
  await virsh.run(['define', xmlPath]);
  try {
    if (options.start) await virsh.run(['start', options.name]);
  } catch (error) {
    await virsh.run(['undefine', options.name]).catch(() => undefined);
    throw new SnapshiftError('VM_START_FAILED', `libvirt defined ${options.name} but could not start it: ${(error as Error).message}`, { cause: error });
  }
  return { name: options.name, kind: 'libvirt', folder, uuid, macs, disks, domain: { xmlPath, uri }, started: options.start };
}
