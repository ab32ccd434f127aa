import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { withStopSignals } from './stop-signals.ts';
import { parse as parseYaml } from 'yaml';
import { SessionState, type Catalog } from '../catalog/index.ts';
import { SnapshiftError } from '../core/errors.ts';
import { jobDefaults, parseJobDefinition, scheduleFormat, type JobDefinition } from '../jobs/job-definition.ts';
import { jobPassword } from '../jobs/job-password.ts';
import { runJob, type JobRunResult } from '../jobs/job-runner.ts';
import { homeOf, openCatalog, printJson } from './context.ts';
import { formatColumns, formatTable, oneLine } from './format.ts';
import { withExamples } from './help-examples.ts';
import { numberOption } from './number-option.ts';
import { resolvePassword } from './password.ts';
import { SessionProgress } from './progress.ts';
import { formatSessionSummary } from './session-commands.ts';

/** Exit status of a job run, by session state (README § Exit codes). */
export const exitStatusBySessionState: Record<SessionState, number> = { Success: 0, Warning: 1, Failed: 2, Stopped: 3, Running: 2 };

interface JobFlags {
  vm?: string[];
  repo?: string;
  mode?: string;
  failoverToRegular?: boolean;
  quiesce?: boolean;
  vmsPerStorageSnapshot?: number;
  parallel?: number;
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  schedule?: string;
  passwordFile?: string;
  maxReadRate?: number;
  verifyBoot?: boolean;
  verifyBootMarker?: string;
  verifyBootTimeout?: number;
}

/** What `job run` takes besides the job's own definition. */
interface JobRunFlags {
  json?: boolean;
  quiet?: boolean;
  full?: boolean;
  maxReadRate?: number;
  maxWriteRate?: number;
}

const collect = (value: string, previous: string[] = []) => [...previous, value];

function addJobFlags(command: Command): Command {
  return command
    .option('--vm <name>', 'a VM to protect (repeat for several)', collect)
    .option('--repo <path>', 'repository path')
    .option('--mode <mode>', `storage-snapshot or regular (default ${jobDefaults.mode}, as for "snapshift backup")`)
    .option('--failover-to-regular', 'fall back to regular mode when a storage snapshot fails (default on)')
    .option('--no-failover-to-regular', 'fail the VM instead of falling back')
    .option('--quiesce', 'freeze guest file systems through the guest agent at the point in time (VM snapshot or fleecing start)')
    .option('--vms-per-storage-snapshot <n>', `at most this many VMs share one storage snapshot (default ${jobDefaults.vmsPerStorageSnapshot})`, numberOption('--vms-per-storage-snapshot'))
    .option('--parallel <n>', `tasks run at once (default ${jobDefaults.parallel})`, numberOption('--parallel'))
    .option('--keep-last <n>', 'retention: keep the last N restore points per VM', numberOption('--keep-last'))
    .option('--keep-daily <n>', 'retention: keep one per day for N days', numberOption('--keep-daily'))
    .option('--keep-weekly <n>', 'retention: keep one per week for N weeks', numberOption('--keep-weekly'))
    .option('--keep-monthly <n>', 'retention: keep one per month for N months', numberOption('--keep-monthly'))
    .option('--schedule <cron>', `cron schedule: ${scheduleFormat}; e.g. "0 22 * * *" is every day at 22:00`)
    .option('--password-file <path>', 'repository password file used when the job runs')
    .option('--max-read-rate <MBps>', 'cap the read rate from production storage (whole MB/s)', numberOption('--max-read-rate', { unit: 'MB/s' }))
    .option('--verify-boot', 'after each backup, boot the new restore point with no network (as "snapshift verify-boot") and record the verdict in the session')
    .option('--no-verify-boot', 'do not verify that restore points boot')
    .option('--verify-boot-marker <regex>', 'what the console prints once the guest is up (default "login:"); implies --verify-boot')
    .option('--verify-boot-timeout <seconds>', 'how long the guest may take to boot (default 300); implies --verify-boot', numberOption('--verify-boot-timeout'));
}

/** Flags given on the command line, as definition fields (undefined = not given). */
function definitionFromFlags(name: string, flags: JobFlags): Record<string, unknown> {
  const retention = Object.fromEntries(
    (['keepLast', 'keepDaily', 'keepWeekly', 'keepMonthly'] as const).filter((key) => flags[key] !== undefined).map((key) => [key, flags[key]]),
  );
  const fields: Record<string, unknown> = {
    name,
    vms: flags.vm,
    repository: flags.repo === undefined ? undefined : resolve(flags.repo),
    mode: flags.mode,
    failoverToRegular: flags.failoverToRegular,
    quiesce: flags.quiesce,
    vmsPerStorageSnapshot: flags.vmsPerStorageSnapshot,
    parallel: flags.parallel,
    retention: Object.keys(retention).length > 0 ? retention : undefined,
    schedule: flags.schedule,
    passwordFile: flags.passwordFile === undefined ? undefined : resolve(flags.passwordFile),
    maxReadRateMBps: flags.maxReadRate,
    verifyBoot:
      flags.verifyBoot === false
        ? false
        : flags.verifyBootMarker !== undefined || flags.verifyBootTimeout !== undefined
          ? { ...(flags.verifyBootMarker !== undefined ? { marker: flags.verifyBootMarker } : {}), ...(flags.verifyBootTimeout !== undefined ? { timeoutSeconds: flags.verifyBootTimeout } : {}) }
          : flags.verifyBoot,
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function loadJob(catalog: Catalog, name: string): JobDefinition {
  const stored = catalog.jobs.getJob(name);
  if (!stored) throw new SnapshiftError('JOB_UNKNOWN', `no job named "${name}" (see "snapshift job list")`);
  return parseJobDefinition(stored.definition);
}

/** `snapshift job create|list|show|edit|delete|run|apply`. */
export function registerJobCommands(program: Command): void {
  const job = withExamples(
    program.command('job').description('backup jobs: what to protect, how, and when'),
    'snapshift job create nightly --vm vm1 --repo /srv/backups --keep-last 7 --schedule "0 22 * * *"',
    'snapshift job run nightly',
  );

  withExamples(
    addJobFlags(job.command('create').description('define a job').argument('<name>')),
    'snapshift job create nightly --vm vm1 --vm vm2 --repo /srv/backups --keep-last 7 --schedule "0 22 * * *"',
    'snapshift job create hourly --vm db1 --repo /srv/backups --mode regular --schedule "0 15 * * * *" --max-read-rate 100',
  )
    .action((name: string, flags: JobFlags, command: Command) => {
      using catalog = openCatalog(command);
      if (catalog.jobs.getJob(name)) throw new SnapshiftError('USAGE', `job "${name}" exists: change it with "snapshift job edit ${name}"`);
      const definition = parseJobDefinition(definitionFromFlags(name, flags));
      catalog.jobs.saveJob(name, { ...definition });
      console.log(`created job ${name}: ${definition.vms.join(', ')} → ${definition.repository} (${definition.mode}${definition.schedule ? `, ${definition.schedule}` : ''})`);
    });

  withExamples(addJobFlags(job.command('edit').description('change fields of a job (others stay)').argument('<name>')), 'snapshift job edit nightly --keep-last 14 --schedule "30 23 * * *"')
    .action((name: string, flags: JobFlags, command: Command) => {
      using catalog = openCatalog(command);
      const current = loadJob(catalog, name);
      const changes = definitionFromFlags(name, flags);
      const definition = parseJobDefinition({ ...current, ...changes, retention: changes.retention ?? current.retention });
      catalog.jobs.saveJob(name, { ...definition });
      console.log(`updated job ${name}`);
    });

  job
    .command('apply')
    .description('create or update jobs from a YAML file (a list of jobs, or { jobs: [...] })')
    .requiredOption('-f, --file <path>', 'YAML file')
    .addHelpText('after', '\nExample:\n  snapshift job apply -f /etc/snapshift/jobs.yaml\n\nExample file:\n  jobs:\n    - name: nightly\n      vms: [vm1, vm2]\n      repository: /srv/backups\n      mode: storage-snapshot\n      retention: { keepLast: 7 }\n      schedule: "0 22 * * *"')
    .action(async (options: { file: string }, command: Command) => {
      let parsed: unknown;
      try {
        parsed = parseYaml(await readFile(options.file, 'utf8'));
      } catch (error) {
        throw new SnapshiftError('USAGE', `cannot read jobs from ${options.file}: ${(error as Error).message}`);
      }
      const list = Array.isArray(parsed) ? parsed : (parsed as { jobs?: unknown } | null)?.jobs;
      if (!Array.isArray(list)) throw new SnapshiftError('USAGE', `${options.file} must hold a list of jobs or { jobs: [...] }`);
      // Validate all first: a file with one bad job changes nothing.
      const definitions = list.map((entry) => parseJobDefinition(entry));
      using catalog = openCatalog(command);
      for (const definition of definitions) catalog.jobs.saveJob(definition.name, { ...definition });
      console.log(`applied ${definitions.length} job(s): ${definitions.map((d) => d.name).join(', ')}`);
    });

  withExamples(job.command('list'), 'snapshift job list', 'snapshift job list --json')
    .description('list jobs')
    .option('--json', 'print the result as JSON')
    .action((options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const jobs = catalog.jobs.listJobs().map((stored) => ({ ...stored, last: catalog.jobs.listSessions(stored.name, 1)[0] }));
      if (options.json) return printJson(jobs);
      if (jobs.length === 0) return console.log('no jobs');
      console.log(
        formatColumns(
          ['NAME', 'VMS', 'MODE', 'SCHEDULE', 'LAST RUN', 'STATE'],
          jobs.map((entry) => {
            const definition = entry.definition as unknown as JobDefinition;
            return [entry.name, definition.vms.join(','), definition.mode, definition.schedule ?? '-', entry.last?.startedAt ?? '-', entry.last?.state ?? '-'];
          }),
        ),
      );
    });

  withExamples(job.command('show'), 'snapshift job show nightly')
    .description('show a job')
    .argument('<name>')
    .option('--json', 'print the result as JSON')
    .action((name: string, options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const definition = loadJob(catalog, name);
      if (options.json) return printJson(definition);
      console.log(
        formatTable([
          ['name', definition.name],
          ['vms', definition.vms.join(', ')],
          ['repository', definition.repository],
          ['mode', definition.mode],
          ['failover to regular', String(definition.failoverToRegular)],
          ['quiesce', String(definition.quiesce)],
          ['VMs per storage snapshot', String(definition.vmsPerStorageSnapshot)],
          ['parallel tasks', String(definition.parallel)],
          ['retention', Object.entries(definition.retention).map(([key, value]) => `${key} ${value}`).join(', ') || 'keep everything'],
          ['schedule', definition.schedule ?? 'by hand only'],
        ]),
      );
    });

  withExamples(job.command('delete'), 'snapshift job delete nightly')
    .description('delete a job (its restore points and sessions stay)')
    .argument('<name>')
    .action((name: string, _options: unknown, command: Command) => {
      using catalog = openCatalog(command);
      if (!catalog.jobs.deleteJob(name)) throw new SnapshiftError('JOB_UNKNOWN', `no job named "${name}"`);
      console.log(`deleted job ${name}`);
    });

  withExamples(job.command('run'), 'snapshift job run nightly', 'snapshift job run nightly --full --max-read-rate 200 --max-write-rate 100')
    .description('run a job now, as one session; Ctrl-C or SIGTERM stops it cleanly (exit 3)')
    .argument('<name>')
    .option('--json', 'print the session as JSON')
    .option('--quiet', 'no progress bars')
    .option('--full', 'read every disk in full, even where changed-block tracking could limit the read (as backup --full)')
    .option('--max-read-rate <MBps>', "cap the read rate (whole MB/s); overrides the job's", numberOption('--max-read-rate', { unit: 'MB/s' }))
    .option('--max-write-rate <MBps>', 'cap the repository write rate (whole MB/s)', numberOption('--max-write-rate', { unit: 'MB/s' }))
    .action(async (name: string, options: JobRunFlags, command: Command) => {
      using catalog = openCatalog(command);
      const definition = loadJob(catalog, name);
      const result = await runJobFromCli(definition, catalog, homeOf(command), { ...options, progress: !options.json && !options.quiet });
      if (options.json) printJson(result);
      else printJobResult(result);
      process.exitCode = exitStatusBySessionState[result.state];
    });
}

/** Runs a job with signal handling: the first Ctrl-C/SIGTERM stops the session cleanly. */
export async function runJobFromCli(
  job: JobDefinition,
  catalog: Catalog,
  home: string,
  options: { progress: boolean; full?: boolean; maxReadRate?: number; maxWriteRate?: number },
): Promise<JobRunResult> {
  const password = await passwordFor(job);
  const progress = new SessionProgress(options.progress, job.name);
  try {
    return await withStopSignals('VM snapshots are committed, storage snapshots removed', (signal) =>
      runJob(job, {
        catalog,
        home,
        password,
        signal,
        onProgress: (p) => progress.update(p.vmName, p.processedBytes, p.totalBytes, p.phase),
        full: options.full ?? false,
        maxReadBytesPerSecond: options.maxReadRate === undefined ? undefined : options.maxReadRate * 1e6,
        maxWriteBytesPerSecond: options.maxWriteRate === undefined ? undefined : options.maxWriteRate * 1e6,
      }),
    );
  } finally {
    progress.stop();
  }
}

/** The job's repository password (jobs/job-password.ts: credential, password file, SNAPSHIFT_PASSWORD), else a prompt. */
export async function passwordFor(job: JobDefinition): Promise<string | undefined> {
  return jobPassword(job, { prompt: () => resolvePassword() });
}

function printJobResult(result: JobRunResult): void {
  console.log(`session ${result.sessionId}: ${result.state}`);
  for (const task of result.tasks) console.log(`  ${task.vmName}: ${task.state}${task.reason ? ` (${oneLine(task.reason)})` : ''}${task.restorePointId ? ` → ${task.restorePointId.slice(0, 12)}` : ''}`);
  console.log(formatSessionSummary(result.summary));
}
