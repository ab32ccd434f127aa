import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { printJson } from './context.ts';
import { withExamples } from './help-examples.ts';
import { numberOption } from './number-option.ts';
import { Lab, LabCeph, datastoreKinds, defaultLabDir, isDatastoreKind, formatByteSize, parseByteSize, zfsDaemonLabel, type LabStatus } from '../lab/index.ts';

interface DirOptions {
  dir: string;
}

/** `snapshift lab …`: the built-in lab of loop-mounted datastores and tiny real guests. */
export function registerLabCommands(program: Command): void {
  const lab = withExamples(
    program.command('lab').description('the built-in lab: btrfs and XFS datastores on loop files, tiny real Linux guests that write steadily'),
    'snapshift lab up && snapshift lab vm create vm1 --datastore btrfs && snapshift lab vm start vm1',
    'snapshift lab down',
  );

  withExamples(withDir(lab.command('up')), 'snapshift lab up', 'snapshift lab up --size 8G --with-zfs')
    .description('create the lab: btrfs and XFS (reflink) datastores on sparse loop files, mounted under the lab folder (needs root)')
    .option('--size <size>', 'size of each sparse datastore file', '4G')
    .option('--with-zfs', 'also a ZFS datastore (zfs-fuse, a pool on a sparse file); same as "lab zfs up" afterwards')
    .action(async (options: DirOptions & { size: string; withZfs?: boolean }) => {
      const started = Date.now();
      const upLab = await Lab.up({ dir: options.dir, datastoreSizeBytes: parseByteSize(options.size, '--size'), zfs: options.withZfs === true });
      const status = await upLab.status();
      for (const datastore of status.datastores) {
        console.log(`${datastore.kind.padEnd(5)} ${datastore.loopDevice ?? '?'} on ${datastore.mountPoint} (${formatByteSize(datastore.sizeBytes)} sparse); VM disks in ${datastore.vmDisksDir}`);
      }
      if (status.zfs) printZfs(status.zfs);
      console.log(`lab up in ${status.dir} (${Date.now() - started} ms)`);
    });

  withExamples(withDir(lab.command('down')), 'snapshift lab down', 'snapshift lab down --purge-cache')
    .description('remove everything the lab made (processes, mounts, loop devices, files), from its state file alone')
    .option('--purge-cache', 'also remove the cached guest kernel in <lab>/cache')
    .action(async (options: DirOptions & { purgeCache?: boolean }) => {
      const started = Date.now();
      const report = await Lab.down(options.dir, { purgeCache: options.purgeCache === true });
      if (!report.wasUp) console.log(`no lab in ${report.dir}; nothing to do`);
      else console.log(`lab down in ${report.dir}: ended ${report.endedPids.length} process(es), removed datastores ${[...report.removedDatastores, ...(report.removedZfsPool ? [`zfs (pool ${report.removedZfsPool})`] : [])].join(', ') || 'none'}${zfsDaemonNote(report.zfsDaemon)} (${Date.now() - started} ms)`);
    });

  const zfs = withExamples(lab.command('zfs').description('the lab\'s ZFS datastore: zfs-fuse and a pool on a sparse file under the lab folder'), 'snapshift lab zfs up', 'snapshift lab zfs down');

  withExamples(withDir(zfs.command('up')), 'snapshift lab zfs up --size 2G')
    .description('add a ZFS datastore to the lab (starts zfs-fuse unless a ZFS daemon runs already; needs root)')
    .option('--size <size>', 'size of the pool\'s sparse file', '4G')
    .action(async (options: DirOptions & { size: string }) => {
      const started = Date.now();
      const upLab = await Lab.open(options.dir);
      await upLab.zfsUp({ sizeBytes: parseByteSize(options.size, '--size') });
      const status = await upLab.status();
      if (status.zfs) printZfs(status.zfs);
      const daemon = status.processes.find((p) => p.label === zfsDaemonLabel);
      console.log(`ZFS up in ${status.dir}: ${daemon ? `zfs-fuse pid ${daemon.pid} started by the lab` : 'using the ZFS daemon already running (the lab will not end it)'} (${Date.now() - started} ms)`);
    });

  withExamples(withDir(zfs.command('down')), 'snapshift lab zfs down')
    .description('destroy the lab\'s ZFS pool and end zfs-fuse if the lab started it and no other pool uses it')
    .action(async (options: DirOptions) => {
      const started = Date.now();
      const report = await (await Lab.open(options.dir)).zfsDown();
      console.log(`ZFS down: ${report.removedZfsPool ? `destroyed pool ${report.removedZfsPool}` : 'no ZFS pool in the lab'}${zfsDaemonNote(report.zfsDaemon)} (${Date.now() - started} ms)`);
    });

  withExamples(withDir(lab.command('status')), 'snapshift lab status', 'snapshift lab status --json')
    .description('show the lab: datastores, VMs, processes')
    .option('--json', 'print one JSON document')
    .action(async (options: DirOptions & { json?: boolean }) => {
      const status = await (await labIfAny(options.dir)).status();
      if (options.json) return printJson(status);
      printStatus(status);
    });

  const vm = withExamples(
    lab.command('vm').description('lab VMs: a qcow2 disk on a datastore and a tiny guest writing to it'),
    'snapshift lab vm create vm1 --datastore btrfs',
    'snapshift lab vm start vm1 --rate 8',
  );

  withExamples(withDir(vm.command('create <name>')), 'snapshift lab vm create vm1 --datastore btrfs', 'snapshift lab vm create big --datastore xfs --size 10G --fill 4G')
    .description('create a VM disk (qcow2) on a datastore: FILL of random data at the start, the rest sparse')
    .requiredOption('--datastore <kind>', 'btrfs or xfs')
    .option('--size <size>', 'virtual disk size', '2G')
    .option('--fill <size>', 'random data written at the start of the disk', '600M')
    .action(async (name: string, options: DirOptions & { datastore: string; size: string; fill: string }) => {
      // Checked before the lab is opened, so a typo gets its own message even without a lab.
      if (!isDatastoreKind(options.datastore)) throw new SnapshiftError('BAD_ARGUMENT', `unknown datastore "${options.datastore}" (the lab has: ${datastoreKinds.join(', ')})`);
      const started = Date.now();
      const record = await (await Lab.open(options.dir)).createVm(name, {
        datastore: options.datastore,
        sizeBytes: parseByteSize(options.size, '--size'),
        fillBytes: parseByteSize(options.fill, '--fill'),
      });
      console.log(`VM ${record.name}: ${record.diskPath} (${formatByteSize(record.sizeBytes)}, ${formatByteSize(record.fillBytes)} random data) (${Date.now() - started} ms)`);
    });

  withExamples(withDir(vm.command('start <name>')), 'snapshift lab vm start vm1', 'snapshift lab vm start vm1 --rate 0')
    .description('boot the VM\'s guest; returns once it writes (QEMU keeps running until stop, kill or lab down)')
    .option('--rate <MiBps>', 'steady write rate of the guest, MiB/s', numberOption('--rate', { min: 0, unit: 'MiB/s' }), 4)
    .action(async (name: string, options: DirOptions & { rate: number }) => {
      const rateMiBps = options.rate;
      const handle = await (await Lab.open(options.dir)).startVm(name, { rateMiBps });
      console.log(`VM ${name} running: pid ${handle.pid}, writing ${rateMiBps} MiB/s; reached its workload in ${handle.bootMs} ms`);
      console.log(`QMP ${handle.qmpSocketPath}; console ${handle.consoleLogPath}; block nodes ${handle.blockNames.fileNode} / ${handle.blockNames.formatNode}, qdev ${handle.blockNames.qdevId}`);
    });

  withExamples(withDir(vm.command('stop <name>')), 'snapshift lab vm stop vm1', 'snapshift lab vm stop vm1 --json')
    .description('stop the guest\'s workload; it prints the md5 of its whole disk and powers off')
    .option('--json', 'print one JSON document')
    .action(async (name: string, options: DirOptions & { json?: boolean }) => {
      const result = await (await runningVm(options.dir, name)).stop();
      if (options.json) return printJson({ name, ...result });
      console.log(`VM ${name} stopped after ${result.writes} writes (${result.writtenMiB} MiB); disk md5 ${result.md5}`);
    });

  withExamples(withDir(vm.command('kill <name>')), 'snapshift lab vm kill vm1')
    .description('kill the VM\'s QEMU at once (like pulling the plug)')
    .action(async (name: string, options: DirOptions) => {
      const handle = await runningVm(options.dir, name);
      await handle.kill();
      console.log(`VM ${name} killed (pid ${handle.pid})`);
    });

  withExamples(withDir(vm.command('list')), 'snapshift lab vm list', 'snapshift lab vm list --json')
    .description('list the lab\'s VMs')
    .option('--json', 'print one JSON document')
    .action(async (options: DirOptions & { json?: boolean }) => {
      const { vms } = await (await Lab.open(options.dir)).status();
      if (options.json) return printJson(vms);
      if (vms.length === 0) console.log('no VMs (create one with "snapshift lab vm create NAME --datastore btrfs")');
      for (const v of vms) console.log(`${v.name.padEnd(12)} ${v.running ? `running (pid ${v.pid})` : 'stopped'.padEnd(20)} ${v.datastore.padEnd(5)} ${formatByteSize(v.sizeBytes).padEnd(8)} ${v.diskPath}`);
    });

  registerLabCephCommands(lab);
}

/** `snapshift lab ceph up|down|status`: single-node Ceph (RBD) in <lab>/ceph. */
function registerLabCephCommands(lab: Command): void {
  const ceph = withExamples(
    lab.command('ceph').description('single-node Ceph for RBD disks: 1 monitor, 1 manager, 1 OSD on a sparse file, loopback, no auth'),
    'snapshift lab ceph up',
    'snapshift lab ceph down',
  );

  withExamples(withDir(ceph.command('up')), 'snapshift lab ceph up', 'snapshift lab ceph up --port 6790 --osd-size 8G')
    .description('start Ceph in <lab>/ceph with an "rbd" pool (~7 s); clients use its ceph.conf (rbd -c, CEPH_CONF, SNAPSHIFT_CEPH_CONF)')
    .option('--port <port>', "the monitor's port on 127.0.0.1 (default: a free one)", numberOption('--port', { max: 65535, unit: 'a TCP port' }))
    .option('--osd-size <size>', "sparse size of the OSD's file", '4G')
    .action(async (options: DirOptions & { port?: number; osdSize: string }) => {
      const port = options.port;
      const started = Date.now();
      const up = await LabCeph.up({ dir: options.dir, osdSizeBytes: parseByteSize(options.osdSize, '--osd-size'), ...(port === undefined ? {} : { port }) });
      console.log(`Ceph up in ${up.dir}, pool "${up.pool}" (${Date.now() - started} ms)`);
      console.log(`export SNAPSHIFT_CEPH_CONF=${up.confPath} CEPH_CONF=${up.confPath}`);
    });

  withExamples(withDir(ceph.command('down')), 'snapshift lab ceph down')
    .description('end the Ceph daemons the lab started (by PID) and remove <lab>/ceph')
    .action(async (options: DirOptions) => {
      const report = await LabCeph.down(options.dir);
      console.log(report.wasUp ? `Ceph down in ${report.labDir}: ended ${report.endedPids.length} process(es)` : `no Ceph in ${report.labDir}; nothing to do`);
    });

  withExamples(withDir(ceph.command('status')), 'snapshift lab ceph status', 'snapshift lab ceph status --json')
    .description("show the lab's Ceph: its config and daemons")
    .option('--json', 'print one JSON document')
    .action(async (options: DirOptions & { json?: boolean }) => {
      const status = await LabCeph.status(options.dir);
      if (options.json) return printJson(status);
      console.log(`Ceph in ${status.labDir}: ${status.up ? 'up' : status.processes.length > 0 ? 'half up (run lab ceph down)' : 'not up'}`);
      if (status.up) console.log(`  conf ${status.confPath}; pool ${status.pool}`);
      for (const p of status.processes) console.log(`  ${p.label.padEnd(12)} pid ${p.pid} ${p.running ? 'running' : 'gone'}`);
    });
}

function withDir(command: Command): Command {
  return command.option('--dir <dir>', 'lab folder', defaultLabDir);
}

/** `lab status` answers "not up" rather than failing when there is no lab. */
async function labIfAny(dir: string): Promise<Pick<Lab, 'status'>> {
  try {
    return await Lab.open(dir);
  } catch (error) {
    if (error instanceof SnapshiftError && error.code === 'LAB_NOT_UP') return { status: async () => ({ dir, up: false, datastores: [], vms: [], processes: [] }) };
    throw error;
  }
}

async function runningVm(dir: string, name: string) {
  const handle = await (await Lab.open(dir)).runningVm(name);
  if (!handle) throw new SnapshiftError('LAB_VM_NOT_RUNNING', `lab VM ${name} is not running`);
  return handle;
}

function printStatus(status: LabStatus): void {
  console.log(`lab ${status.dir}: ${status.up ? 'up' : status.datastores.length > 0 ? 'half up (run lab down)' : 'not up'}`);
  for (const d of status.datastores) console.log(`  datastore ${d.kind.padEnd(5)} ${d.loopDevice ?? '-'} on ${d.mountPoint} ${d.mounted ? 'mounted' : 'NOT MOUNTED'}`);
  if (status.zfs) console.log(`  datastore zfs   pool ${status.zfs.poolName} on ${status.zfs.mountPoint} ${status.zfs.imported ? 'imported' : 'NOT IMPORTED'}; VM disks in ${status.zfs.vmDisksDir}`);
  for (const v of status.vms) console.log(`  vm ${v.name.padEnd(12)} ${v.running ? `running (pid ${v.pid})` : 'stopped'} on ${v.datastore}: ${v.diskPath}`);
  for (const p of status.processes.filter((p) => !p.label.startsWith('vm:'))) console.log(`  process ${p.label} pid ${p.pid} ${p.running ? 'running' : 'gone'}`);
}

function printZfs(zfs: NonNullable<LabStatus['zfs']>): void {
  console.log(`zfs   pool ${zfs.poolName} on ${zfs.imagePath} (${formatByteSize(zfs.sizeBytes)} sparse) at ${zfs.mountPoint} ${zfs.imported ? '' : 'NOT IMPORTED '}; VM disks in ${zfs.vmDisksDir} (dataset ${zfs.dataset})`);
}

function zfsDaemonNote(daemon: 'ended' | 'kept' | 'gone' | undefined): string {
  if (daemon === 'ended') return '; ended zfs-fuse';
  if (daemon === 'kept') return '; left zfs-fuse running (other pools still use it)';
  if (daemon === 'gone') return '; zfs-fuse had already exited';
  return '';
}
