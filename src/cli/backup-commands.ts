import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { ExitStatus, SnapshiftError } from '../core/errors.ts';
import { checkVmName } from '../catalog/index.ts';
import { isProcessingMode, processingModeList, runBackup, type BackupRunResult, type ProcessingMode } from '../processing/backup-run.ts';
import type { TaskStats } from '../processing/task-stats.ts';
import { huntOverlaysOnHosts, huntVmSnapshots } from '../processing/snapshot-hunter.ts';
import { huntInstantRecoveries } from '../restore/instant/instant-recovery.ts';
import { huntStorageSnapshots } from '../processing/storage-hunter.ts';
import { describeTearDown, removeFileRestoreLeftovers } from '../restore/file-level/index.ts';
import { openCatalog, homeOf, printJson } from './context.ts';
import { formatBytes, formatColumns, formatDuration, formatRatio, formatTable, oneLine } from './format.ts';
import { ProgressBar } from './progress.ts';
import { stoppedExitStatus, withStopSignals } from './stop-signals.ts';
import { jobDefaults } from '../jobs/job-definition.ts';
import { withExamples } from './help-examples.ts';
import { numberOption } from './number-option.ts';
import { openRepositoryForCli, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';

/** `snapshift backup`, `restore-points`, `hunt`: the daily verbs (`restore` is in restore-command.ts). */
export function registerBackupCommands(program: Command): void {
  withExamples(
    repositoryOption(
      program
        .command('backup')
        .description('back up VMs into a repository')
        .argument('<vm...>', 'VM names (see "snapshift host list")')
        .option('--mode <mode>', 'storage-snapshot (falls back to regular mode, saying why, where no storage snapshot can be taken), regular, or fleecing (copy-before-write: no delta file, no commit); jobs default to the same', jobDefaults.mode)
        .option('--no-failover-to-regular', 'in storage-snapshot mode, fail instead of falling back to regular mode')
        .option('--vms-per-storage-snapshot <n>', 'at most this many VMs share one storage snapshot', numberOption('--vms-per-storage-snapshot'), jobDefaults.vmsPerStorageSnapshot)
        .option('--full', 'read every disk in full, even where changed-block tracking could limit the read')
        .option('--max-read-rate <MBps>', 'cap the read rate (whole MB/s), e.g. to spare a busy production link', numberOption('--max-read-rate', { unit: 'MB/s' }))
        .option('--quiesce', 'freeze guest file systems through the guest agent at the point in time: the VM snapshot or the fleecing start (qemu: host add --qga; libvirt: its agent channel)')
        .option('--overlay-folder <dir>', 'local folder for the VM snapshot overlays of disks that are not files (RBD); default <home>/overlays')
        .option('--json', 'print the result as JSON')
        .option('--quiet', 'no progress bar'),
    ),
    'snapshift backup vm1 --repo /srv/backups --password-file /root/.repo-pass',
    'snapshift backup vm1 vm2 vm3 --repo /srv/backups --max-read-rate 200',
    'snapshift backup vm1 --mode regular --full --repo /srv/backups',
  )
    .action(
      async (
        vmNames: string[],
        options: RepositoryCliOptions & { mode: string; full?: boolean; quiesce?: boolean; failoverToRegular: boolean; vmsPerStorageSnapshot: number; maxReadRate?: number; overlayFolder?: string; json?: boolean; quiet?: boolean },
        command: Command,
      ) => {
        if (!isProcessingMode(options.mode)) throw new SnapshiftError('USAGE', `unknown mode "${options.mode}": use ${processingModeList}`);
        const mode: ProcessingMode = options.mode;
        const { vmsPerStorageSnapshot, maxReadRate } = options;
        for (const name of vmNames) checkVmName(name);
        using catalog = openCatalog(command);
        const vms = vmNames.map((name) => {
          const vm = catalog.getVm(name);
          if (!vm) throw new SnapshiftError('VM_UNKNOWN', `no VM named "${name}": add it with "snapshift host add qemu --qmp PATH --name ${name}", or add its libvirt host ("snapshift host add libvirt --uri URI")`);
          return vm;
        });
        await using repository = await openRepositoryForCli(options, catalog, vmNames[0]);
        const bars = new Map(vms.map((vm) => [vm.name, new ProgressBar(!options.json && !options.quiet, vm.name)]));
        let run: BackupRunResult;
        let stopped = false;
        try {
          run = await withStopSignals('VM snapshots are committed, storage snapshots removed, no partial restore point', async (signal) => {
            const result = await runBackup({
              vms,
              mode,
              repository,
              catalog,
              runDir: join(homeOf(command), 'run'),
              failoverToRegular: options.failoverToRegular,
              quiesce: options.quiesce,
              vmsPerStorageSnapshot,
              full: options.full ?? false,
              maxReadBytesPerSecond: maxReadRate === undefined ? undefined : maxReadRate * 1e6,
              overlayFolder: resolve(options.overlayFolder ?? join(homeOf(command), 'overlays')),
              signal,
              onProgress: (progress) => bars.get(progress.vmName)?.update(progress.processedBytes, progress.totalBytes, progress.phase),
            });
            stopped = signal.aborted;
            return result;
          });
        } finally {
          for (const bar of bars.values()) bar.stop();
        }
        if (stopped) {
          const kept = run.outcomes.filter((outcome) => outcome.result);
          for (const outcome of kept) console.error(`${outcome.vmName}: restore point ${outcome.result!.restorePoint.id} was complete before the stop and is kept`);
          console.error(`snapshift: backup stopped; ${run.outcomes.length - kept.length} VM(s) without a new restore point`);
          process.exitCode = stoppedExitStatus;
          return;
        }
        const failed = run.outcomes.filter((outcome) => outcome.error).length;
        // One VM that failed is the command's failure: one line on stderr, exit 2 (as for any error).
        if (!options.json && run.outcomes.length === 1 && run.outcomes[0]!.error) throw run.outcomes[0]!.error;
        if (options.json) {
          printJson({
            sessionId: run.sessionId,
            storageSnapshots: run.storageSnapshotCount,
            hunted: run.hunted,
            vms: run.outcomes.map((outcome) => ({
              vm: outcome.vmName,
              restorePointId: outcome.result?.restorePoint.id,
              stats: outcome.result?.stats,
              failoverReason: outcome.result?.failoverReason,
              warnings: outcome.result?.warnings ?? outcome.warnings,
              storage: outcome.result?.storageKinds,
              error: outcome.error?.message,
            })),
          });
        } else {
          for (const action of run.hunted.vmSnapshots) console.log(`hunter: ${action.action} ${action.overlayPath} (${action.detail})`);
          for (const action of run.hunted.storageSnapshots) console.log(`hunter: ${action.action} ${action.kind} snapshot ${action.location} (${action.detail})`);
          for (const outcome of run.outcomes) {
            if (outcome.error) {
              console.error(`${outcome.vmName}: failed: ${oneLine(outcome.error.message)}`);
              for (const warning of outcome.warnings ?? []) console.error(`${outcome.vmName}: warning: ${oneLine(warning)}`);
              continue;
            }
            const result = outcome.result!;
            console.log(`\n${outcome.vmName}: restore point ${result.restorePoint.id}`);
            if (result.failoverReason) console.log(`  failover to regular mode: ${oneLine(result.failoverReason)}`);
            for (const warning of result.warnings ?? []) console.error(`${outcome.vmName}: warning: ${oneLine(warning)}`);
            if (result.storageKinds && result.stats.mode === 'storage-snapshot') console.log(`  storage snapshot by: ${result.storageKinds.join(', ')}`);
            console.log(formatSummary(result.stats));
          }
        }
        if (failed > 0) {
          process.exitCode = failed === run.outcomes.length ? 2 : 1;
        } else if (run.outcomes.some((outcome) => outcome.result?.failoverReason || (outcome.result?.warnings?.length ?? 0) > 0)) {
          process.exitCode = 1;
        }
      },
    );

  withExamples(program.command('restore-points'), 'snapshift restore-points vm1', 'snapshift restore-points --json')
    .description('list restore points (from the catalog)')
    .argument('[vm]', 'only this VM')
    .option('--json', 'print the result as JSON')
    .action((vmName: string | undefined, options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const points = catalog.listRestorePoints(vmName);
      if (options.json) return printJson(points);
      if (points.length === 0) return console.log(vmName ? `no restore points for ${vmName}` : 'no restore points');
      console.log(
        formatColumns(
          ['ID', 'VM', 'CREATED', 'MODE', 'PROCESSED', 'TRANSFERRED', 'REPOSITORY'],
          points.map((p) => [p.id.slice(0, 12), p.vmName, p.createdAt, p.mode, formatBytes(Number(p.stats.processedBytes ?? 0)), formatBytes(Number(p.stats.transferredBytes ?? 0)), p.repositoryPath]),
        ),
      );
    });

  withExamples(program.command('hunt'), 'snapshift hunt --dry-run', 'snapshift hunt')
    .description('find and remove VM snapshots and storage snapshots that crashed or killed backups left behind, the mounts, loop devices and disk readers of killed "files" runs, and instant recoveries whose VM has gone; exit 2 if any is left in place')
    .option('--dry-run', 'only report what would be done')
    .option('--json', 'print the result as JSON')
    .action(async (options: { dryRun?: boolean; json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const dryRun = options.dryRun ?? false;
      const vmSnapshots = [...(await huntVmSnapshots(catalog, { dryRun })), ...(await huntOverlaysOnHosts(catalog, { dryRun }))];
      const storageSnapshots = await huntStorageSnapshots(catalog, { dryRun });
      // Mounts, loop devices and disk readers of killed `snapshift files` runs (src/restore/file-level/leftovers.ts).
      const fileRestores = await removeFileRestoreLeftovers(join(homeOf(command), 'run'), { dryRun });
      // Instant recoveries whose VM has gone: their overlays (and a server that still runs).
      const instantRecoveries = await huntInstantRecoveries(homeOf(command), { dryRun });
      // Something still in place (a VM on an overlay, a storage snapshot) is a failure an admin must see.
      const leftInPlace =
        vmSnapshots.filter((action) => action.action === 'left-in-place').length +
        storageSnapshots.filter((action) => action.action === 'failed').length +
        fileRestores.filter((report) => report.problems.length > 0).length;
      if (leftInPlace > 0) process.exitCode = ExitStatus.failed;
      if (options.json) return printJson({ dryRun, vmSnapshots, storageSnapshots, fileRestores, instantRecoveries, leftInPlace });
      for (const report of fileRestores) for (const line of describeTearDown(report, dryRun)) console.log(`file-level restore leftover: ${line}`);
      for (const action of instantRecoveries) console.log(`${action.action} instant recovery ${action.name} (${action.detail})`);
      if (vmSnapshots.length + storageSnapshots.length + fileRestores.length + instantRecoveries.length === 0) return console.log('nothing left behind');
      const prefix = dryRun ? 'would: ' : '';
      for (const action of vmSnapshots) {
        const what = action.action === 'removed-export' ? action.detail : `VM snapshot of ${action.vmName}: ${action.overlayPath} (${action.detail})`;
        console.log(`${prefix}${action.action} ${what}`);
      }
      for (const action of storageSnapshots) console.log(`${prefix}${action.action} ${action.kind} storage snapshot ${action.location} (${action.detail})`);
      if (leftInPlace > 0) console.error(`snapshift hunt: ${leftInPlace} leftover(s) could not be removed; see above`);
    });
}

/** The summary a backup prints: Veeam's figures plus what the VM snapshot cost the guest. */
export function formatSummary(stats: TaskStats): string {
  return formatTable([
    ['mode', stats.mode],
    ['processed', formatBytes(stats.processedBytes)],
    ['read', formatBytes(stats.readBytes)],
    ['transferred', formatBytes(stats.transferredBytes)],
    ['dedup ratio', formatRatio(stats.dedupRatio)],
    ['compression ratio', formatRatio(stats.compressionRatio)],
    ['duration', formatDuration(stats.durationMs)],
    ['rate', `${stats.rateMBps.toFixed(1)} MB/s`],
    // Fleecing takes no VM snapshot: its own cost is how long the filter lived and what it copied aside.
    ...(stats.fleecingLifetimeMs !== null && stats.fleecingLifetimeMs !== undefined
      ? ([
          ['fleecing lifetime', formatDuration(stats.fleecingLifetimeMs)],
          ['scratch used', formatBytes(stats.scratchBytes ?? 0)],
        ] as Array<[string, string]>)
      : ([
          ['VM-snapshot lifetime', formatDuration(stats.vmSnapshotLifetimeMs)],
          ['delta at commit', formatBytes(stats.deltaBytesAtCommit)],
          ['commit time', formatDuration(stats.commitMs)],
        ] as Array<[string, string]>)),
    ...(stats.storageSnapshotLifetimeMs !== null ? [['storage-snapshot lifetime', formatDuration(stats.storageSnapshotLifetimeMs)] as [string, string]] : []),
    ['busy', `source ${stats.busyPercent.source}%, proxy ${stats.busyPercent.proxy}%, target ${stats.busyPercent.target}%`],
    ['bottleneck', stats.bottleneck],
    ...(stats.quiesce ? [['quiesce', stats.quiesce] as [string, string]] : []),
    ...stats.disks.map((disk) => [`disk ${disk.name}`, formatDiskCbt(disk)] as [string, string]),
  ]);
}

/** One line per disk: incremental (CBT source, dirty vs read) or full, and why full when it could have been not. */
function formatDiskCbt(disk: TaskStats['disks'][number]): string {
  if (disk.cbtSource !== 'none') return `incremental (${disk.cbtSource}): ${formatBytes(disk.dirtyBytes ?? 0)} changed, ${formatBytes(disk.readBytes)} read`;
  return `full read, ${formatBytes(disk.readBytes)} read${disk.fallbackReason ? ` (${disk.fallbackReason})` : ''}`;
}
