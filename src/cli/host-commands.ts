import { readdirSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { checkVmName } from '../catalog/index.ts';
import { QemuHost } from '../hypervisor/qemu/qemu-host.ts';
import { openCatalog, printJson } from './context.ts';
import { formatBytes, formatColumns } from './format.ts';
import { withExamples } from './help-examples.ts';

/** `snapshift host add|list|remove|discover`: where the VMs are. */
export function registerHostCommands(program: Command): void {
  const host = withExamples(
    program.command('host').description('hypervisor hosts: for QEMU, one QMP socket per VM'),
    'snapshift host add qemu --qmp /run/vm1/qmp.sock --name vm1',
    'snapshift host discover /run/qemu',
  );

  host
    .command('add')
    .description('register a QEMU VM by its QMP socket (checks that it answers and lists its disks)')
    .argument('<kind>', 'hypervisor kind: qemu')
    .requiredOption('--qmp <path>', 'QMP unix socket of the QEMU process')
    .requiredOption('--name <name>', 'VM name used by backup and restore')
    .option('--nbd-socket <path>', 'NBD server socket the process already runs (qemu-storage-daemon --nbd-server)')
    .option('--qga <path>', "host side of the VM's guest agent channel (for --quiesce)")
    .option('--json', 'print the result as JSON')
    .addHelpText('after', '\nExamples:\n  snapshift host add qemu --qmp /run/vm1/qmp.sock --name vm1\n  snapshift host add qemu --qmp /run/vm1/qmp.sock --name vm1 --qga /run/vm1/qga.sock')
    .action(async (kind: string, options: { qmp: string; name: string; nbdSocket?: string; qga?: string; json?: boolean }, command: Command) => {
      if (kind !== 'qemu') throw new SnapshiftError('USAGE', `unknown host kind "${kind}": only "qemu" is supported`);
      checkVmName(options.name);
      const address = {
        name: options.name,
        qmpSocketPath: resolve(options.qmp),
        nbdSocketPath: options.nbdSocket ? resolve(options.nbdSocket) : null,
        qgaSocketPath: options.qga ? resolve(options.qga) : null,
      };
      await using qemu = await QemuHost.connect(address);
      const disks = await qemu.listDisks();
      using catalog = openCatalog(command);
      const record = catalog.addHost({ ...address, kind: 'qemu' });
      if (options.json) return printJson({ host: record, disks });
      console.log(`added VM ${record.name} (${record.qmpSocketPath}) with ${disks.length} disk(s):`);
      for (const disk of disks) console.log(`  ${disk.name}: ${disk.imagePath} (${disk.format}, ${formatBytes(disk.virtualSizeBytes)})`);
    });

  withExamples(host.command('discover'), 'snapshift host discover /run/qemu')
    .description('register every QEMU QMP socket found under a folder (VM name: the socket\'s folder name)')
    .argument('<folder>', 'folder to search, e.g. /run/qemu')
    .option('--json', 'print the result as JSON')
    .action(async (folder: string, options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const found: Array<{ name: string; qmpSocketPath: string; error?: string }> = [];
      for (const socketPath of findSockets(resolve(folder), 4)) {
        const name = basename(socketPath) === 'qmp.sock' ? basename(dirname(socketPath)) : basename(socketPath).replace(/\.(qmp\.)?sock$/, '');
        try {
          await using qemu = await QemuHost.connect({ name, qmpSocketPath: socketPath }, 3_000);
          await qemu.listDisks();
          catalog.addHost({ name, kind: 'qemu', qmpSocketPath: socketPath, nbdSocketPath: null });
          found.push({ name, qmpSocketPath: socketPath });
        } catch (error) {
          found.push({ name, qmpSocketPath: socketPath, error: (error as Error).message });
        }
      }
      if (options.json) return printJson(found);
      if (found.length === 0) console.log(`no unix sockets under ${folder}`);
      for (const entry of found) console.log(entry.error ? `skipped ${entry.qmpSocketPath}: ${entry.error}` : `added ${entry.name} (${entry.qmpSocketPath})`);
    });

  withExamples(host.command('list'), 'snapshift host list', 'snapshift host list --json')
    .description('list registered hosts')
    .option('--json', 'print the result as JSON')
    .action((options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const hosts = catalog.listHosts();
      if (options.json) return printJson(hosts);
      console.log(formatColumns(['NAME', 'KIND', 'QMP SOCKET'], hosts.map((h) => [h.name, h.kind, h.qmpSocketPath])));
    });

  withExamples(host.command('remove'), 'snapshift host remove vm1')
    .description('forget a host (its restore points stay in the repository)')
    .argument('<name>')
    .action((name: string, _options: unknown, command: Command) => {
      using catalog = openCatalog(command);
      if (!catalog.removeHost(name)) throw new SnapshiftError('HOST_UNKNOWN', `no host named "${name}"`);
      console.log(`removed ${name}`);
    });
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
