import type { QemuVmConfiguration, VmDisk } from '../hypervisor.ts';
import type { QmpSession } from './qmp-session.ts';

interface QomProperty {
  name: string;
  type: string;
}

interface ChardevInfo {
  label: string;
  filename: string;
}

/** Network device models we recognise as NICs (their `mac` property is the guest's MAC address). */
const nicModels = new Set(['virtio-net-pci', 'virtio-net-pci-non-transitional', 'e1000', 'e1000e', 'rtl8139', 'vmxnet3', 'ne2k_pci', 'pcnet', 'i82559er']);

/**
 * What it takes to start the VM again, read from QEMU over QMP (nothing from its command line, which may
 * not be ours to read): machine, accelerator, CPU model and count, memory, a directly booted kernel, the
 * disks in guest order with their device model, NICs, serial ports and their back-ends, the guest-agent
 * channel. qemu-storage-daemon has no machine: those fields stay null or empty there.
 */
export async function captureQemuConfiguration(qmp: QmpSession, disks: readonly VmDisk[], uuid: string | null): Promise<QemuVmConfiguration> {
  const optional = <T>(work: Promise<T>): Promise<T | null> => work.catch(() => null);
  const qomGet = <T>(path: string, property: string) => optional(qmp.execute<T>('qom-get', { path, property }));
  const qomList = async (path: string) => (await optional(qmp.execute<QomProperty[]>('qom-list', { path }))) ?? [];

  const machineType = await qomGet<string>('/machine', 'type');
  const cpus = await optional(qmp.execute<Array<{ 'qom-path': string }>>('query-cpus-fast'));
  const cpuType = cpus?.[0] ? await qomGet<string>(cpus[0]['qom-path'], 'type') : null;
  const memory = await optional(qmp.execute<{ 'base-memory': number }>('query-memory-size-summary'));
  const kvm = await optional(qmp.execute<{ enabled: boolean }>('query-kvm'));
  const kernel = await qomGet<string>('/machine', 'kernel');
  const chardevs = (await optional(qmp.execute<ChardevInfo[]>('query-chardev'))) ?? [];
  const chardevByLabel = new Map(chardevs.map((chardev) => [chardev.label, chardev.filename]));

  // Devices a user named (-device …,id=X) and anonymous ones; -serial ports sit unattached on the ISA bus.
  const devices: Array<{ path: string; type: string; id: string | null }> = [];
  for (const [folder, named] of [['/machine/peripheral', true], ['/machine/peripheral-anon', false], ['/machine/unattached', false]] as const) {
    for (const child of await qomList(folder)) {
      const type = /^child<(.+)>$/.exec(child.type)?.[1];
      if (type) devices.push({ path: `${folder}/${child.name}`, type, id: named ? child.name : null });
    }
  }

  const configuredDisks: QemuVmConfiguration['disks'] = [];
  for (const disk of disks) {
    const device = devices.find((candidate) => candidate.id === disk.name);
    configuredDisks.push({ name: disk.name, format: disk.format, virtualSizeBytes: disk.virtualSizeBytes, device: device?.type ?? null });
  }

  const nics: NonNullable<QemuVmConfiguration['nics']> = [];
  for (const device of devices.filter((candidate) => nicModels.has(candidate.type))) {
    const mac = await qomGet<string>(device.path, 'mac');
    if (mac) nics.push({ id: device.id, model: device.type, mac });
  }

  const serials: NonNullable<QemuVmConfiguration['serials']> = [];
  for (const device of devices.filter((candidate) => candidate.type === 'isa-serial')) {
    const index = await qomGet<number>(device.path, 'index');
    const label = await qomGet<string>(device.path, 'chardev');
    serials.push({ index: index ?? serials.length, ...chardevBackend(label ? chardevByLabel.get(label) : undefined) });
  }
  serials.sort((a, b) => a.index - b.index);

  let guestAgent = false;
  for (const device of devices.filter((candidate) => candidate.type === 'virtserialport')) {
    if ((await qomGet<string>(device.path, 'name')) === 'org.qemu.guest_agent.0') guestAgent = true;
  }

  return {
    kind: 'qemu',
    uuid,
    machine: machineType ? machineType.replace(/-machine$/, '') : null,
    accelerator: kvm ? (kvm.enabled ? 'kvm' : 'tcg') : null,
    cpuModel: cpuType ? cpuType.replace(/-x86_64-cpu$/, '') : null,
    cpuCount: cpus ? cpus.length : null,
    memoryBytes: memory ? memory['base-memory'] : null,
    directBoot: kernel
      ? { kernel, initrd: (await qomGet<string>('/machine', 'initrd')) ?? '', append: (await qomGet<string>('/machine', 'append')) ?? '' }
      : null,
    disks: configuredDisks,
    nics,
    serials,
    guestAgent,
  };
}

/**
 * A chardev's back-end from query-chardev's filename: "file" (QEMU 7.2 names no path for a file),
 * "unix:/s,server=on" (prefixed "disconnected:" while no client is connected), "pty:/dev/pts/3", …
 */
function chardevBackend(filename: string | undefined): Pick<NonNullable<QemuVmConfiguration['serials']>[number], 'backend' | 'path'> {
  const name = filename?.replace(/^disconnected:/, '');
  if (!name) return { backend: 'none', path: null };
  if (name === 'file' || name.startsWith('file:')) return { backend: 'file', path: name.startsWith('file:') ? name.slice('file:'.length) : null };
  if (name.startsWith('unix:')) return { backend: 'unix-socket', path: name.slice('unix:'.length).split(',')[0]! };
  if (name.startsWith('pty')) return { backend: 'pty', path: null };
  return { backend: 'none', path: null };
}
