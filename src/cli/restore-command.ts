import { mkdir, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { checkVmName, type Catalog } from '../catalog/index.ts';
import { SnapshiftError } from '../core/errors.ts';
import { restoreDisk, type RestoreFormat } from '../restore/disk-restore.ts';
import { restoreVm, type RestoredVm } from '../restore/vm/vm-restore.ts';
import { homeOf, openCatalog, printJson } from './context.ts';
import { formatBytes } from './format.ts';
import { withExamples } from './help-examples.ts';
import { ProgressBar } from './progress.ts';
import { stoppedExitStatus, withStopSignals } from './stop-signals.ts';
import { openRepositoryForCli, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';

/** `snapshift restore`: the disks of a restore point to files, under a shared repository lock. */
export function registerRestoreCommand(program: Command): void {
  withExamples(
    repositoryOption(
      program
        .command('restore')
        .description(
          'restore the disks of a VM from a restore point, in one pass, to files, block devices or RBD images; or, as "restore vm NAME", the whole VM ' +
            '(its disks into a datastore folder, and a libvirt domain or a QEMU launch unit from its captured configuration). Ctrl-C or SIGTERM stops it and removes what it wrote',
        )
        .argument('<vm>', 'VM name (or the word "vm", then the VM name: a whole-VM restore)')
        .argument('[name]', 'with "vm": the VM to restore')
        .option(
          '--to <path>',
          'target file for one disk; a folder (created if missing, in a folder that exists) when the restore point has several disks or with --all-disks, ' +
            'each disk written there as <disk>.<format>; an existing folder also takes a single disk. Also a block device (with --force), or rbd:POOL/IMAGE (raw; several disks become IMAGE-<disk>)',
        )
        .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
        .option('--disk <name>', 'restore only this disk')
        .option('--all-disks', 'restore every disk into the folder --to, even when there is only one')
        .option('--format <format>', 'qcow2 or raw', 'raw')
        .option('--force', 'overwrite existing files')
        .option('--to-datastore <dir>', 'restore vm: the datastore folder; the VM goes to <dir>/<name>/ (disks as qcow2, domain.xml or launch.json + start.sh)')
        .option('--name <name>', 'restore vm: the restored VM\'s name (default the original\'s); another name gives it a new UUID and MAC addresses, to run beside the original')
        .option('--start', 'restore vm: start the VM once restored')
        .option('--host <name>', 'restore vm: the libvirt host to define a libvirt VM on (default the one it was backed up from)')
        .option('--json', 'print the result as JSON')
        .option('--quiet', 'no progress bar'),
    ),
    'snapshift restore vm1 --point latest --to /var/tmp/vm1.qcow2 --format qcow2',
    'snapshift restore vm1 --all-disks --to /var/tmp/vm1-disks',
    'snapshift restore vm1 --disk vdb --to /var/tmp/vm1-vdb.raw',
    'snapshift restore vm1 --disk vda --to /dev/sdc --force',
    'snapshift restore vm1 --disk vda --to rbd:vms/vm1-restored',
    'snapshift restore vm vm1 --point latest --to-datastore /srv/vms --name vm1-restored --start',
  )
    .action(
      async (
        vmOrWord: string,
        vmToRestore: string | undefined,
        options: RestoreCliOptions,
        command: Command,
      ) => {
        if (vmToRestore !== undefined) {
          if (vmOrWord !== 'vm') throw new SnapshiftError('USAGE', `unexpected argument "${vmToRestore}": restore a VM's disks with "restore VM --to PATH", a whole VM with "restore vm VM --to-datastore DIR"`);
          return restoreWholeVm(vmToRestore, options, command);
        }
        const vmName = vmOrWord;
        if (options.to === undefined) throw new SnapshiftError('USAGE', 'restore needs --to PATH (or, for a whole VM, "restore vm VM --to-datastore DIR")');
        for (const vmOnly of ['toDatastore', 'name', 'start', 'host'] as const) {
          if (options[vmOnly] !== undefined) throw new SnapshiftError('USAGE', `--${vmOnly.replace(/[A-Z]/g, (letter) => `-${letter.toLowerCase()}`)} is for "restore vm VM --to-datastore DIR"`);
        }
        if (options.format !== 'raw' && options.format !== 'qcow2') throw new SnapshiftError('USAGE', `unknown format "${options.format}": use raw or qcow2`);
        if (options.disk !== undefined && options.allDisks) throw new SnapshiftError('USAGE', '--disk and --all-disks exclude each other: restore one disk, or all of them');
        const target = options.to;
        const toRbd = target.startsWith('rbd:');
        const to = toRbd ? target : resolve(target);
        const toIsFolder = !toRbd && ((await stat(to).catch(() => undefined))?.isDirectory() ?? false);
        // Checked before the repository is opened (and a password asked for): a typo in --to fails at once.
        if (!toRbd) await requireFolder(dirname(to), to);
        try {
          await withStopSignals('the partial file is removed', async (signal) => {
            using catalog = openCatalog(command);
            await using repository = await openRepositoryForCli(options, catalog, vmName);
            // One shared lock for every disk, taken before the restore point is read: gc waits for us.
            await using _lock = await repository.lockForReading(`restore of ${vmName}`, (message) => process.stderr.write(`snapshift: warning: ${message}\n`));
            const pointId = resolvePoint(catalog, vmName, options.point);
            const reader = await repository.openRestorePoint(pointId);
            if (reader.summary.vmName !== vmName) throw new SnapshiftError('USAGE', `restore point ${pointId} belongs to ${reader.summary.vmName}, not ${vmName}`);
            const disks = options.disk ? [options.disk] : reader.summary.disks.map((disk) => disk.name);
            const toFolder = toIsFolder || options.allDisks === true || disks.length > 1;
            if (toFolder && !toIsFolder && !toRbd) await mkdir(to);
            const restored: Array<{ disk: string; path: string; sizeBytes: number }> = [];
            for (const disk of disks) {
              const path = !toFolder ? to : toRbd ? `${to}-${disk}` : join(to, `${disk}.${options.format}`);
              const bar = new ProgressBar(!options.json && !options.quiet, `restore ${disk}`);
              try {
                const result = await restoreDisk(reader, disk, path, {
                  format: options.format as RestoreFormat,
                  force: options.force ?? false,
                  chunkSizeBytes: repository.chunkSizeBytes,
                  signal,
                  onProgress: (done, total) => bar.update(done, total, 'restore'),
                });
                restored.push({ disk, path, sizeBytes: result.sizeBytes });
              } finally {
                bar.stop();
              }
            }
            if (options.json) return printJson({ restorePoint: reader.summary.id, restored });
            for (const entry of restored) console.log(`restored ${vmName}/${entry.disk} (${formatBytes(entry.sizeBytes)}) from ${reader.summary.id} to ${entry.path}`);
          });
        } catch (error) {
          if (!(error instanceof SnapshiftError && error.code === 'RESTORE_STOPPED')) throw error;
          process.stderr.write(`snapshift: ${error.message}\n`);
          process.exitCode = stoppedExitStatus;
        }
      },
    );
}

interface RestoreCliOptions extends RepositoryCliOptions {
  to?: string;
  point: string;
  disk?: string;
  allDisks?: boolean;
  format: string;
  force?: boolean;
  json?: boolean;
  quiet?: boolean;
  toDatastore?: string;
  name?: string;
  start?: boolean;
  host?: string;
}

/** `restore vm VM --to-datastore DIR`: the whole VM, registered in the catalog so it can be backed up again. */
async function restoreWholeVm(vmName: string, options: RestoreCliOptions, command: Command): Promise<void> {
  if (options.toDatastore === undefined) throw new SnapshiftError('USAGE', 'restore vm needs --to-datastore DIR (the folder the VM goes into)');
  for (const diskOnly of ['to', 'disk', 'allDisks', 'force'] as const) {
    if (options[diskOnly] !== undefined) throw new SnapshiftError('USAGE', `--${diskOnly.replace(/[A-Z]/g, (letter) => `-${letter.toLowerCase()}`)} is for a disk restore, not "restore vm"`);
  }
  const datastore = resolve(options.toDatastore);
  await requireFolder(datastore, join(datastore, options.name ?? vmName));
  const name = options.name ?? vmName;
  checkVmName(name);
  try {
    await withStopSignals('what it wrote is removed', async (signal) => {
      using catalog = openCatalog(command);
      const taken = catalog.getVm(name);
      if (taken && name !== vmName) throw new SnapshiftError('VM_NAME_TAKEN', `a VM named "${name}" is already registered (on host ${taken.hostName}): choose another --name`);
      const hostName = options.host ?? catalog.getVm(vmName)?.hostName;
      const host = hostName === undefined ? undefined : catalog.getHost(hostName);
      if (options.host !== undefined && !host) throw new SnapshiftError('HOST_UNKNOWN', `no host named "${options.host}" (snapshift host list)`);
      await using repository = await openRepositoryForCli(options, catalog, vmName);
      await using _lock = await repository.lockForReading(`restore of ${vmName}`, (message) => process.stderr.write(`snapshift: warning: ${message}\n`));
      const reader = await repository.openRestorePoint(resolvePoint(catalog, vmName, options.point));
      if (reader.summary.vmName !== vmName) throw new SnapshiftError('USAGE', `restore point ${reader.summary.id} belongs to ${reader.summary.vmName}, not ${vmName}`);
      const bars = new Map<string, ProgressBar>();
      let restored: RestoredVm;
      try {
        restored = await restoreVm({
          reader,
          chunkSizeBytes: repository.chunkSizeBytes,
          datastore,
          name,
          newIdentity: name !== vmName,
          start: options.start ?? false,
          home: homeOf(command),
          ...(host?.kind === 'libvirt' ? { libvirtUri: host.uri } : {}),
          signal,
          onDiskProgress: (disk, done, total) => {
            if (!bars.has(disk)) bars.set(disk, new ProgressBar(!options.json && !options.quiet, `restore ${disk}`));
            bars.get(disk)!.update(done, total, 'restore');
          },
        });
      } finally {
        for (const bar of bars.values()) bar.stop();
      }
      if (restored.kind === 'qemu') catalog.addQemuVm({ name, qmpSocketPath: restored.launchUnit!.qmpSocketPath });
      else catalog.addVm({ name, hostName: host!.name, ref: name, uuid: restored.uuid });
      if (options.json) return printJson({ restorePoint: reader.summary.id, vm: vmName, ...restored });
      console.log(`restored ${vmName} from ${reader.summary.id} as ${restored.kind === 'libvirt' ? 'libvirt domain' : 'QEMU VM'} ${name} in ${restored.folder} (UUID ${restored.uuid})`);
      if (restored.launchUnit) console.log(`  start it with ${restored.launchUnit.startScript}; QMP at ${restored.launchUnit.qmpSocketPath}${restored.started ? ` (running, pid ${restored.pid})` : ''}`);
      if (restored.domain) console.log(`  defined on ${restored.domain.uri}${restored.started ? ' and started' : `; virsh -c ${restored.domain.uri} start ${name}`}`);
    });
  } catch (error) {
    if (!(error instanceof SnapshiftError && error.code === 'RESTORE_STOPPED')) throw error;
    process.stderr.write(`snapshift: ${error.message}\n`);
    process.exitCode = stoppedExitStatus;
  }
}

/** `folder` (the one holding `target`) must exist: say so, rather than ENOENT on a temp file's name. */
async function requireFolder(folder: string, target: string): Promise<void> {
  const info = await stat(folder).catch(() => undefined);
  if (info?.isDirectory()) return;
  throw new SnapshiftError(
    'RESTORE_TARGET_FOLDER_MISSING',
    info ? `cannot restore to ${target}: ${folder} is not a folder` : `cannot restore to ${target}: the folder ${folder} does not exist; create it first (mkdir -p ${folder}) or choose another --to`,
  );
}

/** A restore point id from --point: "latest" is the VM's newest in the catalog; anything else is an id or prefix. */
export function resolvePoint(catalog: Catalog, vmName: string, point: string): string {
  if (point !== 'latest') return point;
  const latest = catalog.listRestorePoints(vmName).at(-1);
  if (!latest) throw new SnapshiftError('RESTORE_POINT_UNKNOWN', `no restore points for ${vmName} in the catalog (a new or lost catalog? run "snapshift catalog sync --repo PATH", or give --point ID)`);
  return latest.id;
}
