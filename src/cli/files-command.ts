import { lstat, mkdir } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import {
  copyOut,
  describeTearDown,
  FileRestoreSession,
  listEntries,
  modeString,
  parseGuestPath,
  removeFileRestoreLeftovers,
  resolveInsideGuest,
  type CopySummary,
  type FileEntry,
  type Volume,
} from '../restore/file-level/index.ts';
import { homeOf, openCatalog, printJson } from './context.ts';
import { formatBytes, formatColumns } from './format.ts';
import { withExamples } from './help-examples.ts';
import { openRepositoryForCli, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';
import { resolvePoint } from './restore-command.ts';
import { StopRequested, withStopSignals } from './stop-signals.ts';

type FilesOptions = RepositoryCliOptions & { point: string; json?: boolean; replay: boolean };

/** `snapshift files ls|get`: single files and folders out of a restore point's ext4, XFS and btrfs filesystems. */
export function registerFilesCommands(program: Command): void {
  const files = withExamples(
    program
      .command('files')
      .description(
        'file-level restore: list and copy files out of a restore point (ext2/3/4, XFS, btrfs; MBR, GPT or whole-disk), mounted read-only; ' +
          'journals are replayed into a throwaway overlay, never into the restore point. ' +
          'Paths start with the disk or partition: /vda1/etc/hostname (partition 1 of vda), /vdb/... (a filesystem on the whole disk vdb)',
      ),
    'snapshift files ls vm1',
    'snapshift files get vm1 /vda1/etc/hostname --to /srv/restore',
  );

  withExamples(
    repositoryOption(
      files
        .command('ls')
        .description('without a path: the disks and partitions of the restore point with their filesystems; with one: that file, or the folder\'s entries (type, mode, owner, size, mtime)')
        .argument('<vm>', 'VM name')
        .argument('[path]', 'path in the restore point: /PARTITION/path/inside (a trailing slash follows a final symlink)', '/')
        .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
        .option('--no-replay', 'do not replay journals and logs (for one too damaged to replay): shows only what was written back from them at the point in time')
        .option('--json', 'print the listing as JSON'),
    ),
    'snapshift files ls vm1',
    'snapshift files ls vm1 --point 3f2a /vda1/etc',
    'snapshift files ls vm1 /vda2/home/alice --json',
  ).action(async (vmName: string, path: string, options: FilesOptions, command: Command) => {
    await runFilesCommand(command, vmName, options, async ({ session, pointId, signal }) => {
      const guestPath = parseGuestPath(path, session.volumes);
      if (!guestPath.volume) {
        const volumes = session.volumes.map(volumeJson);
        if (options.json) return printJson({ vm: vmName, restorePoint: pointId, path: '/', volumes });
        console.log(
          formatColumns(
            ['PATH', 'SIZE', 'PARTITION', 'FILESYSTEM', 'LABEL'],
            volumes.map((volume) => [
              volume.path,
              formatBytes(volume.sizeBytes),
              volume.partition === null ? 'whole disk' : `${volume.scheme} ${volume.partition} (type ${volume.partitionType})`,
              volume.filesystem ?? `- (${volume.unsupported})`,
              volume.label,
            ]),
          ),
        );
        return;
      }
      const hostPath = await resolvedHostPath(session, guestPath.volume, guestPath.inner, guestPath.followLast);
      const { self, children } = await listEntries(hostPath, guestPath.path, signal);
      if (options.json) return printJson({ vm: vmName, restorePoint: pointId, path: guestPath.path, entry: self, entries: children });
      const shown = self.type === 'directory' ? children : [self];
      if (shown.length === 0) return console.log(`${guestPath.path}: empty folder`);
      console.log(formatColumns(['MODE', 'OWNER', 'SIZE', 'MODIFIED', 'NAME'], shown.map(entryRow)));
    });
  });

  withExamples(
    repositoryOption(
      files
        .command('get')
        .description(
          'copy files, symlinks or whole folders out of a restore point into a local folder, keeping owners, modes, times and symlinks; ' +
            'each PATH lands in --to under its own name',
        )
        .argument('<vm>', 'VM name')
        .argument('<paths...>', 'paths in the restore point: /PARTITION/path/inside')
        .requiredOption('--to <dir>', 'local folder to copy into (created if missing)')
        .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
        .option('--force', 'copy over files of the same names already in --to')
        .option('--no-replay', 'do not replay journals and logs (for one too damaged to replay): shows only what was written back from them at the point in time')
        .option('--json', 'print what was copied as JSON'),
    ),
    'snapshift files get vm1 /vda1/etc/hostname /vda1/etc/ssh --to /srv/restore',
    'snapshift files get vm1 --point 3f2a "/vdb1/srv/shared data" --to . --force',
  ).action(async (vmName: string, paths: string[], options: FilesOptions & { to: string; force?: boolean }, command: Command) => {
    const targetFolder = resolve(options.to);
    await runFilesCommand(command, vmName, options, async ({ session, pointId, signal }) => {
      const started = performance.now();
      const wanted = paths.map((path) => {
        const guestPath = parseGuestPath(path, session.volumes);
        if (!guestPath.volume) throw new SnapshiftError('USAGE', `"${path}" names no partition: give paths such as /vda1/etc (snapshift files ls ${vmName} lists the partitions)`);
        return { ...guestPath, volume: guestPath.volume };
      });
      await mkdir(targetFolder, { recursive: true });
      const plans: Array<{ path: string; hostPath: string; target: string }> = [];
      for (const item of wanted) {
        const hostPath = await resolvedHostPath(session, item.volume, item.inner, item.followLast);
        const root = await session.mountedRoot(item.volume);
        const target = join(targetFolder, hostPath === root ? item.volume.name : basename(hostPath));
        const clash = plans.find((plan) => plan.target === target);
        if (clash) throw new SnapshiftError('USAGE', `${clash.path} and ${item.path} would both be copied to ${target}: get them in two runs with different --to`);
        if (!options.force && (await lstat(target).then(() => true, () => false))) throw new SnapshiftError('RESTORE_TARGET_EXISTS', `${target} exists: choose another --to, or pass --force to copy over it`);
        plans.push({ path: item.path, hostPath, target });
      }
      const copied: Array<{ path: string; to: string } & CopySummary> = [];
      for (const plan of plans) {
        const summary = await copyOut(plan.hostPath, plan.target, { overwrite: options.force === true, signal });
        copied.push({ path: plan.path, to: plan.target, ...summary });
        if (!options.json) {
          console.log(`copied ${plan.path} to ${plan.target} (${summary.files} files, ${summary.directories} folders, ${summary.symlinks} symlinks, ${formatBytes(summary.sizeBytes)})`);
        }
      }
      if (options.json) printJson({ vm: vmName, restorePoint: pointId, to: targetFolder, copied, durationMs: Math.round(performance.now() - started) });
    });
  });
}

interface FilesContext {
  session: FileRestoreSession;
  pointId: string;
  signal: AbortSignal;
}

/**
 * What `ls` and `get` share: leftovers of killed runs removed, the repository share-locked, the restore point
 * opened as a session whose mounts are all undone when `work` ends, fails or is stopped.
 */
async function runFilesCommand(command: Command, vmName: string, options: FilesOptions, work: (context: FilesContext) => Promise<void>): Promise<void> {
  const runRoot = join(homeOf(command), 'run');
  await withStopSignals('mounts, loop devices and disk readers are removed', async (signal) => {
    for (const report of await removeFileRestoreLeftovers(runRoot)) {
      const lines = describeTearDown(report);
      if (lines.length > 0) process.stderr.write(`snapshift: a killed "files" run left pieces behind: ${lines.join('; ')}\n`);
    }
    try {
      using catalog = openCatalog(command);
      await using repository = await openRepositoryForCli(options, catalog, vmName);
      const onWarning = (message: string) => process.stderr.write(`snapshift: warning: ${message}\n`);
      const lockPurpose = `restoring files of ${vmName}`;
      await using _lock = await repository.lockForReading(lockPurpose, onWarning);
      const reader = await repository.openRestorePoint(resolvePoint(catalog, vmName, options.point));
      if (reader.summary.vmName !== vmName) throw new SnapshiftError('USAGE', `restore point ${reader.summary.id} belongs to ${reader.summary.vmName}, not ${vmName}`);
      await using session = await FileRestoreSession.open({ reader, runRoot, onWarning, lockPurpose, noReplay: options.replay === false });
      await work({ session, pointId: reader.summary.id, signal });
      if (signal.aborted) throw signal.reason;
    } catch (error) {
      if (signal.aborted) {
        const by = signal.reason instanceof StopRequested ? signal.reason.signal : 'a stop request';
        throw new SnapshiftError('FILES_STOPPED', `stopped by ${by}: every mount, loop device and disk reader of this run was removed; files already copied stay`, { cause: error });
      }
      throw error;
    }
  });
}

/** The host path of a path inside `volume`, mounting the volume first. */
async function resolvedHostPath(session: FileRestoreSession, volume: Volume, inner: string, followLast: boolean): Promise<string> {
  const root = await session.mountedRoot(volume);
  return resolveInsideGuest(root, inner, `/${volume.name}`, followLast);
}

function volumeJson(volume: Volume) {
  const supported = volume.filesystem.kind !== 'unsupported';
  return {
    path: `/${volume.name}`,
    disk: volume.disk,
    partition: volume.partition,
    scheme: volume.scheme,
    startBytes: volume.startBytes,
    sizeBytes: volume.sizeBytes,
    partitionType: volume.partitionType,
    partitionName: volume.partitionName,
    filesystem: volume.filesystem.kind === 'unsupported' ? null : volume.filesystem.kind,
    label: volume.filesystem.kind === 'unsupported' ? '' : volume.filesystem.label,
    uuid: volume.filesystem.kind === 'unsupported' ? null : volume.filesystem.uuid,
    ...(supported ? {} : { unsupported: (volume.filesystem as { what: string }).what }),
  };
}

function entryRow(entry: FileEntry): string[] {
  return [
    modeString(entry.type, entry.mode),
    `${entry.uid}:${entry.gid}`,
    String(entry.sizeBytes),
    entry.mtime.replace(/\.\d{3}Z$/, 'Z'),
    entry.symlinkTarget === undefined ? entry.name : `${entry.name} -> ${entry.symlinkTarget}`,
  ];
}
