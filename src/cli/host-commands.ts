import { readdirSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { checkVmName, type Catalog, type HostRecord, type VmTarget } from '../catalog/index.ts';
import type { VmDisk } from '../hypervisor/hypervisor.ts';
import { hostKinds, hypervisorFor, openVm } from '../hypervisor/registry.ts';
import { openCatalog, printJson } from './context.ts';
import { formatBytes, formatColumns } from './format.ts';
import { withExamples } from './help-examples.ts';

/** `snapshift host add|list|remove|discover` and `snapshift vm list`: where the VMs are. */
export function registerHostCommands(program: Command): void {
  const host = withExamples(
    program.command('host').description('hypervisor hosts: a QEMU QMP socket (one VM) or a libvirt connection (its domains)'),
    'snapshift host add qemu --qmp /run/vm1/qmp.sock --name vm1',
    'snapshift host add libvirt --uri qemu:///system',
    'snapshift host discover /run/qemu',
  );

  host
    .command('add')
    .description('register a QEMU VM by its QMP socket, or a libvirt host and its domains (checks that it answers)')
    .argument('<kind>', `hypervisor kind: ${hostKinds().join(' or ')}`)
    .option('--qmp <path>', 'qemu: QMP unix socket of the QEMU process')
    .option('--name <name>', 'qemu: VM name used by backup and restore; libvirt: host name (default: from the URI)')
    .option('--nbd-socket <path>', 'qemu: NBD server socket the process already runs (qemu-storage-daemon --nbd-server)')
    .option('--qga <path>', "qemu: host side of the VM's guest agent channel (for --quiesce)")
    .option('--uri <uri>', 'libvirt: connection URI, e.g. qemu:///system or qemu+ssh://root@kvm1/system')
    .option('--json', 'print the result as JSON')
    .addHelpText(
      'after',
      '\nExamples:\n  snapshift host add qemu --qmp /run/vm1/qmp.sock --name vm1\n  snapshift host add qemu --qmp /run/vm1/qmp.sock --name vm1 --qga /run/vm1/qga.sock\n  snapshift host add libvirt --uri qemu:///system --name kvm1',
    )
    .action(async (kind: string, options: { qmp?: string; name?: string; nbdSocket?: string; qga?: string; uri?: string; json?: boolean }, command: Command) => {
      if (kind === 'qemu') return addQemuHost(options, command);
      if (kind === 'libvirt') return addLibvirtHost(options, command);
      throw new SnapshiftError('USAGE', `unknown host kind "${kind}": ${hostKinds().join(' or ')}`);
    });

  withExamples(host.command('discover'), 'snapshift host discover /run/qemu', 'snapshift host discover kvm1')
    .description("register new VMs: a libvirt host's domains, or every QEMU QMP socket under a folder (VM name: the socket's folder name)")
    .argument('<host-or-folder>', 'a registered libvirt host, or a folder to search for QMP sockets, e.g. /run/qemu')
    .option('--json', 'print the result as JSON')
    .action(async (target: string, options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const registered = catalog.getHost(target);
      if (registered && registered.kind !== 'qemu') {
        const found = await registerHostVms(catalog, registered);
        if (options.json) return printJson(found);
        printRegistered(registered.name, found);
        return;
      }
      const found: Array<{ name: string; qmpSocketPath: string; error?: string }> = [];
      for (const socketPath of findSockets(resolve(target), 4)) {
        const name = basename(socketPath) === 'qmp.sock' ? basename(dirname(socketPath)) : basename(socketPath).replace(/\.(qmp\.)?sock$/, '');
        try {
          const address = { name, kind: 'qemu' as const, qmpSocketPath: socketPath, nbdSocketPath: null };
          const [vm] = await hypervisorFor(address).listVms({ ...address, createdAt: '' });
          catalog.addHost(address);
          catalog.addVm({ name, hostName: name, ref: name, uuid: vm?.uuid ?? null });
          found.push({ name, qmpSocketPath: socketPath });
        } catch (error) {
          found.push({ name, qmpSocketPath: socketPath, error: (error as Error).message });
        }
      }
      if (options.json) return printJson(found);
      if (found.length === 0) console.log(`no unix sockets under ${target}`);
      for (const entry of found) console.log(entry.error ? `skipped ${entry.qmpSocketPath}: ${entry.error}` : `added ${entry.name} (${entry.qmpSocketPath})`);
    });

  withExamples(host.command('list'), 'snapshift host list', 'snapshift host list --json')
    .description('list registered hosts and how many VMs each serves')
    .option('--json', 'print the result as JSON')
    .action((options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const hosts = catalog.listHosts().map((record) => ({ ...record, vms: catalog.listVms(record.name).map((vm) => vm.name) }));
      if (options.json) return printJson(hosts);
      console.log(formatColumns(['NAME', 'KIND', 'ADDRESS', 'VMS'], hosts.map((h) => [h.name, h.kind, addressOf(h), h.vms.join(', ') || '-'])));
    });

  withExamples(host.command('remove'), 'snapshift host remove vm1')
    .description('forget a host and its VMs (their restore points stay in the repository)')
    .argument('<name>')
    .action((name: string, _options: unknown, command: Command) => {
      using catalog = openCatalog(command);
      if (!catalog.removeHost(name)) throw new SnapshiftError('HOST_UNKNOWN', `no host named "${name}"`);
      console.log(`removed ${name}`);
    });

  const vm = withExamples(program.command('vm').description('the VMs snapshift protects, across hosts'), 'snapshift vm list');
  withExamples(vm.command('list'), 'snapshift vm list', 'snapshift vm list --json')
    .description('list registered VMs with their host, name on the host and UUID')
    .option('--json', 'print the result as JSON')
    .action((options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const vms = catalog.listVms();
      if (options.json) return printJson(vms);
      console.log(formatColumns(['NAME', 'HOST', 'ON HOST', 'UUID'], vms.map((v) => [v.name, v.hostName, v.ref, v.uuid ?? '-'])));
    });
  withExamples(vm.command('remove'), 'snapshift vm remove web1')
    .description('stop protecting a VM (its restore points stay in the repository)')
    .argument('<name>')
    .action((name: string, _options: unknown, command: Command) => {
      using catalog = openCatalog(command);
      if (!catalog.removeVm(name)) throw new SnapshiftError('VM_UNKNOWN', `no VM named "${name}"`);
      console.log(`removed ${name}`);
    });
}

async function addQemuHost(options: { qmp?: string; name?: string; nbdSocket?: string; qga?: string; json?: boolean }, command: Command): Promise<void> {
  if (!options.qmp || !options.name) throw new SnapshiftError('USAGE', 'host add qemu needs --qmp <socket> and --name <vm name>');
  checkVmName(options.name);
  const address = {
    name: options.name,
    kind: 'qemu' as const,
    qmpSocketPath: resolve(options.qmp),
    nbdSocketPath: options.nbdSocket ? resolve(options.nbdSocket) : null,
    qgaSocketPath: options.qga ? resolve(options.qga) : null,
  };
  const target: VmTarget = { name: options.name, hostName: options.name, ref: options.name, uuid: null, createdAt: '', host: { ...address, createdAt: '' } };
  const [listed] = await hypervisorFor(address).listVms(target.host);
  let disks: VmDisk[];
  {
    await using vm = await openVm(target);
    disks = await vm.listDisks();
  }
  using catalog = openCatalog(command);
  catalog.addHost(address);
  const record = catalog.addVm({ name: options.name, hostName: options.name, ref: options.name, uuid: listed?.uuid ?? null });
  if (options.json) return printJson({ host: catalog.getHost(options.name), vm: record, disks });
  console.log(`added VM ${record.name} (${address.qmpSocketPath}) with ${disks.length} disk(s):`);
  for (const disk of disks) console.log(`  ${disk.name}: ${disk.imagePath} (${disk.format}, ${formatBytes(disk.virtualSizeBytes)})`);
}

async function addLibvirtHost(options: { name?: string; uri?: string; json?: boolean }, command: Command): Promise<void> {
  if (!options.uri) throw new SnapshiftError('USAGE', 'host add libvirt needs --uri <connection URI>, e.g. qemu:///system');
  const name = options.name ?? hostNameOfUri(options.uri);
  checkVmName(name);
  const address = { name, kind: 'libvirt' as const, uri: options.uri };
  // Asked before anything is stored: a wrong URI or a stopped libvirtd is a clear error, not a dead host row.
  await hypervisorFor(address).listVms({ ...address, createdAt: '' });
  using catalog = openCatalog(command);
  const record = catalog.addHost(address);
  const found = await registerHostVms(catalog, record);
  if (options.json) return printJson({ host: record, vms: found });
  console.log(`added libvirt host ${name} (${options.uri})`);
  printRegistered(name, found);
}

/** Registers every VM the host serves that is not registered yet (a name taken on another host is reported). */
async function registerHostVms(catalog: Catalog, host: HostRecord): Promise<Array<{ name: string; uuid: string | null; state: string; error?: string }>> {
  const found: Array<{ name: string; uuid: string | null; state: string; error?: string }> = [];
  for (const vm of await hypervisorFor(host).listVms(host)) {
    try {
      catalog.addVm({ name: vm.ref, hostName: host.name, ref: vm.ref, uuid: vm.uuid });
      found.push({ name: vm.ref, uuid: vm.uuid, state: vm.state });
    } catch (error) {
      found.push({ name: vm.ref, uuid: vm.uuid, state: vm.state, error: (error as Error).message });
    }
  }
  return found;
}

function printRegistered(hostName: string, found: ReadonlyArray<{ name: string; uuid: string | null; state: string; error?: string }>): void {
  if (found.length === 0) console.log(`host ${hostName} serves no VMs yet`);
  for (const vm of found) console.log(vm.error ? `  skipped ${vm.name}: ${vm.error}` : `  VM ${vm.name} (${vm.state}, uuid ${vm.uuid ?? '-'})`);
}

/** `qemu+ssh://root@kvm1/system` → `kvm1`; a local URI (`qemu:///system`) → `localhost`. */
function hostNameOfUri(uri: string): string {
  const match = uri.match(/^[a-z0-9+]+:\/\/(?:[^@/]*@)?([^/:?]*)/i);
  const name = match?.[1] || 'localhost';
  return name.replace(/[^A-Za-z0-9_.-]/g, '-');
}

function addressOf(host: HostRecord): string {
  return host.kind === 'qemu' ? host.qmpSocketPath : host.uri;
}

function findSockets(folder: string, depth: number): string[] {
  const sockets: string[] = [];
  let entries: string[];
  try {
    entries = readdirSync(folder);
  } catch (error) {
    throw new SnapshiftError('USAGE', `cannot read ${folder}: ${(error as Error).message}`);
  }
  for (const entry of entries) {
    const path = join(folder, entry);
    const info = statSync(path, { throwIfNoEntry: false });
    if (info?.isSocket() && /qmp/i.test(entry)) sockets.push(path);
    else if (info?.isDirectory() && depth > 0) sockets.push(...findSockets(path, depth - 1));
  }
  return sockets;
}
