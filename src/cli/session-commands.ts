import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { markCrashedSessions } from '../jobs/job-runner.ts';
import type { SessionSummary } from '../jobs/session-summary.ts';
import { openCatalog, printJson } from './context.ts';
import { formatBytes, formatColumns, formatDuration, formatRatio, formatTable, oneLine } from './format.ts';
import { withExamples } from './help-examples.ts';
import { numberOption } from './number-option.ts';

/** `snapshift session list|show`: what happened, and where the time went. */
export function registerSessionCommands(program: Command): void {
  const session = withExamples(program.command('session').description('sessions: one run of a job each'), 'snapshift session list --job nightly', 'snapshift session show 1f3c9a2b');

  withExamples(session.command('list'), 'snapshift session list', 'snapshift session list --job nightly --limit 5 --json')
    .description('list recent sessions, newest first')
    .option('--job <name>', 'only this job')
    .option('--limit <n>', 'at most this many', numberOption('--limit'), 20)
    .option('--json', 'print the result as JSON')
    .action((options: { job?: string; limit: number; json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      markCrashedSessions(catalog);
      const sessions = catalog.jobs.listSessions(options.job, options.limit);
      if (options.json) return printJson(sessions);
      if (sessions.length === 0) return console.log('no sessions');
      console.log(
        formatColumns(
          ['ID', 'JOB', 'STATE', 'STARTED', 'DURATION', 'PROCESSED', 'TRANSFERRED', 'BOTTLENECK'],
          sessions.map((s) => {
            const summary = s.summary as Partial<SessionSummary>;
            return [s.id.slice(0, 8), s.jobName ?? '-', s.state, s.startedAt, summary.durationMs ? formatDuration(summary.durationMs) : '-', formatBytes(summary.processedBytes ?? 0), formatBytes(summary.transferredBytes ?? 0), summary.bottleneck ?? '-'];
          }),
        ),
      );
    });

  withExamples(session.command('show'), 'snapshift session show 1f3c9a2b', 'snapshift session show 1f3c9a2b --json')
    .description('show a session: per-VM results and statistics')
    .argument('<id>', 'session id or its first characters')
    .option('--json', 'print the result as JSON')
    .action((id: string, options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const record = catalog.jobs.getSession(id);
      if (!record) throw new SnapshiftError('SESSION_UNKNOWN', `no session ${id} (see "snapshift session list")`);
      const tasks = catalog.jobs.listTasks(record.id);
      if (options.json) return printJson({ ...record, tasks });
      console.log(`session ${record.id} (${record.jobName ?? 'no job'}): ${record.state}, started ${record.startedAt}${record.endedAt ? `, ended ${record.endedAt}` : ''}`);
      console.log(formatSessionSummary(record.summary as unknown as SessionSummary));
      for (const task of tasks) {
        const stats = task.stats as { processedBytes?: number; readBytes?: number; transferredBytes?: number; vmSnapshotLifetimeMs?: number; bottleneck?: string; mode?: string } | null;
        console.log(`  ${task.vmName}: ${task.state}${task.reason ? ` — ${oneLine(task.reason)}` : ''}`);
        if (stats) {
          console.log(
            `    ${stats.mode}: processed ${formatBytes(stats.processedBytes ?? 0)}, read ${formatBytes(stats.readBytes ?? 0)}, transferred ${formatBytes(stats.transferredBytes ?? 0)}, VM snapshot ${formatDuration(stats.vmSnapshotLifetimeMs ?? 0)}, bottleneck ${stats.bottleneck}`,
          );
        }
      }
    });
}

export function formatSessionSummary(summary: SessionSummary): string {
  if (!summary || summary.tasks === undefined) return '  (no statistics)';
  return formatTable([
    ['tasks', `${summary.tasks.total} (${summary.tasks.success} success, ${summary.tasks.warning} warning, ${summary.tasks.failed} failed, ${summary.tasks.stopped} stopped)`],
    ['processed', formatBytes(summary.processedBytes)],
    ['read', formatBytes(summary.readBytes)],
    ['transferred', formatBytes(summary.transferredBytes)],
    ['dedup ratio', summary.dedupRatio === null ? '-' : formatRatio(summary.dedupRatio)],
    ['compression ratio', summary.compressionRatio === null ? '-' : formatRatio(summary.compressionRatio)],
    ['duration', formatDuration(summary.durationMs)],
    ['rate', `${summary.rateMBps.toFixed(1)} MB/s`],
    ['storage snapshots', String(summary.storageSnapshots)],
    ['busy', summary.busyPercent ? `source ${summary.busyPercent.source}%, proxy ${summary.busyPercent.proxy}%, target ${summary.busyPercent.target}%` : '-'],
    ['bottleneck', summary.bottleneck ?? '-'],
    ...(summary.retention ? [['retention', `${summary.retention.forgotten.length} restore point(s) forgotten (run "snapshift gc" to reclaim space)`] as [string, string]] : []),
  ]);
}
