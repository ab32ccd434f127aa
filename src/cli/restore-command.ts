import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import type { Catalog } from '../catalog/index.ts';
import { SnapshiftError } from '../core/errors.ts';
import { restoreDisk, type RestoreFormat } from '../restore/disk-restore.ts';
import { openCatalog, printJson } from './context.ts';
import { formatBytes } from './format.ts';
import { ProgressBar } from './progress.ts';
import { stoppedExitStatus, withStopSignals } from './stop-signals.ts';
import { openRepositoryForCli, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';

/** `snapshift restore`: the disks of a restore point to files, under a shared repository lock. */
export function registerRestoreCommand(program: Command): void {
  repositoryOption(
    program
      .command('restore')
      .description('restore the disks of a VM from a restore point to files; Ctrl-C or SIGTERM stops it and removes the partial file')
      .argument('<vm>', 'VM name')
      .requiredOption('--to <path>', 'target file (one disk) or folder (several disks)')
      .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
      .option('--disk <name>', 'restore only this disk')
      .option('--format <format>', 'qcow2 or raw', 'raw')
      .option('--force', 'overwrite existing files')
      .option('--json', 'print the result as JSON')
      .option('--quiet', 'no progress bar'),
  )
    .addHelpText('after', '\nExample:\n  snapshift restore vm1 --point latest --to /var/tmp/vm1.qcow2 --format qcow2')
    .action(
      async (
        vmName: string,
        options: RepositoryCliOptions & { to: string; point: string; disk?: string; format: string; force?: boolean; json?: boolean; quiet?: boolean },
        command: Command,
      ) => {
        if (options.format !== 'raw' && options.format !== 'qcow2') throw new SnapshiftError('USAGE', `unknown format "${options.format}": use raw or qcow2`);
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
            const toFolder = disks.length > 1;
            const restored: Array<{ disk: string; path: string; sizeBytes: number }> = [];
            for (const disk of disks) {
              const path = toFolder ? join(resolve(options.to), `${disk}.${options.format}`) : resolve(options.to);
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

function resolvePoint(catalog: Catalog, vmName: string, point: string): string {
  if (point !== 'latest') return point;
  const latest = catalog.listRestorePoints(vmName).at(-1);
  if (!latest) throw new SnapshiftError('RESTORE_POINT_UNKNOWN', `no restore points for ${vmName} in the catalog (a new or lost catalog? run "snapshift catalog sync --repo PATH", or give --point ID)`);
  return latest.id;
}
