import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import type { Command } from 'commander';
import pino from 'pino';
import type { Catalog } from '../catalog/index.ts';
import { messageOf } from '../core/errors.ts';
import { InstanceLock } from '../jobs/instance-lock.ts';
import { parseJobDefinition, type JobDefinition } from '../jobs/job-definition.ts';
import { jobPassword } from '../jobs/job-password.ts';
import { repositoryEncryption } from '../repository/index.ts';
import { runJob } from '../jobs/job-runner.ts';
import { faultPoint } from '../core/fault-points.ts';
import { Scheduler } from '../jobs/scheduler.ts';
import { daemonUnitText } from '../jobs/systemd-unit.ts';
import { homeOf, openCatalog } from './context.ts';

const levelNames: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** `snapshift daemon`: runs scheduled jobs; `--install-unit` writes a systemd unit for it. */
export function registerDaemonCommand(program: Command): void {
  program
    .command('daemon')
    .description('run scheduled jobs (one daemon per catalog); logs JSON to <home>/logs/daemon.log')
    .option('--install-unit [path]', 'write a systemd unit instead of running (job password files become its credentials)', false)
    .option('--password-file <file>', 'with --install-unit: password for jobs without a password file of their own, passed as a credential')
    .addHelpText(
      'after',
      '\nExamples:\n  snapshift daemon\n  snapshift daemon --install-unit && systemctl enable --now snapshift\n  snapshift daemon --install-unit --password-file /root/.repo-pass',
    )
    .action(async (options: { installUnit: string | boolean; passwordFile?: string }, command: Command) => {
      const home = homeOf(command);
      if (options.installUnit !== false) {
        using catalog = openCatalog(command);
        return await installUnit(catalog, home, typeof options.installUnit === 'string' ? options.installUnit : '/etc/systemd/system/snapshift.service', options.passwordFile);
      }
      using _lock = InstanceLock.acquire(join(home, 'daemon.lock'));
      mkdirSync(join(home, 'logs'), { recursive: true });
      const logger = pino(
        { base: { pid: process.pid } },
        pino.multistream([{ stream: pino.destination({ dest: join(home, 'logs', 'daemon.log'), sync: true, mkdir: true }) }, { stream: humanStream() }]),
      );
      using catalog = openCatalog(command);
      const controller = new AbortController();
      const scheduler = new Scheduler({
        catalog,
        logger,
        run: async (job) => {
          faultPoint('daemon.after-job-start');
          // No terminal here: a password the job cannot find fails its session, with the reason, in the catalog.
          return runJob(job, { catalog, home, password: () => jobPassword(job), signal: controller.signal });
        },
      });
      scheduler.start();
      logger.info({ home }, `snapshift daemon started (pid ${process.pid}), ${catalog.jobs.listJobs().filter((job) => job.definition.schedule).length} scheduled job(s)`);
      await new Promise<void>((resolveStop) => {
        const stop = (signal: string) => {
          logger.info(`${signal}: stopping; running jobs end cleanly`);
          controller.abort();
          resolveStop();
        };
        process.once('SIGINT', () => stop('SIGINT'));
        process.once('SIGTERM', () => stop('SIGTERM'));
      });
      await scheduler.stop();
      logger.info('snapshift daemon stopped');
    });
}

/** Human lines on the terminal: time, level, message; the file keeps the full JSON. */
function humanStream(): Writable {
  return new Writable({
    write(chunk: Buffer, _encoding, done) {
      try {
        const entry = JSON.parse(chunk.toString()) as { time: number; level: number; msg: string };
        process.stderr.write(`${new Date(entry.time).toISOString()} ${(levelNames[entry.level] ?? entry.level).toString().padEnd(5)} ${entry.msg}\n`);
      } catch {
        process.stderr.write(chunk);
      }
      done();
    },
  });
}

/** Writes the daemon's systemd unit; says which jobs on encrypted repositories would find no password. */
async function installUnit(catalog: Catalog, home: string, path: string, defaultPasswordFile: string | undefined): Promise<void> {
  const jobs: JobDefinition[] = [];
  for (const stored of catalog.jobs.listJobs()) {
    try {
      jobs.push(parseJobDefinition(stored.definition));
    } catch (error) {
      console.error(`snapshift: warning: job ${stored.name} is invalid and left out of the unit: ${messageOf(error)}`);
    }
  }
  const launcher = resolve(fileURLToPath(new URL('../../bin/snapshift', import.meta.url)));
  writeFileSync(path, daemonUnitText({ nodePath: process.execPath, launcher, home, jobs, defaultPasswordFile }));
  for (const job of jobs) {
    if (job.schedule && job.passwordFile === undefined && defaultPasswordFile === undefined && (await repositoryEncryption(job.repository)) !== 'none') {
      console.error(`snapshift: warning: job ${job.name}: its repository is encrypted and it has no password file: its runs will fail (give it --password-file, or pass --password-file here)`);
    }
  }
  console.log(`wrote ${path}; enable it with: systemctl daemon-reload && systemctl enable --now ${path.split('/').at(-1)}`);
}
