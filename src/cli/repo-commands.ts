import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { printJson } from './context.ts';
import { withExamples } from './help-examples.ts';
import { numberOption, parseCliNumber } from './number-option.ts';
import { resolvePassword } from './password.ts';
import { openRepositoryAt } from './repository-access.ts';
import { forgetInCatalog } from './catalog-commands.ts';
import {
  addKey, applyRetention, checkRepository, collectGarbage, forgetRestorePoints, initRepository, listKeys,
  removeKey, repairIndex, repositoryInfo, type Repository, type RetentionPolicy,
} from '../repository/index.ts';
import { resolve } from 'node:path';

interface RepoOptions {
  repo?: string;
  passwordFile?: string;
  json?: boolean;
}

/**
 * The repository a command names: the positional PATH or --repo (the same thing twice is fine, two different
 * ones are a usage error), else $SNAPSHIFT_REPOSITORY. Every repository command takes both forms alike.
 */
function repoPath(positional: string | undefined, opts: RepoOptions): string {
  if (positional !== undefined && opts.repo !== undefined && resolve(positional) !== resolve(opts.repo)) {
    throw new SnapshiftError('USAGE', `two repositories given: ${positional} and --repo ${opts.repo}; name one`);
  }
  const path = positional ?? opts.repo ?? process.env.SNAPSHIFT_REPOSITORY;
  if (!path) throw new SnapshiftError('USAGE', 'no repository given: name it (snapshift repo info PATH), use --repo PATH or set SNAPSHIFT_REPOSITORY');
  return path;
}

/** Opens the repository, asking for a password only if it is encrypted. */
async function open(positional: string | undefined, opts: RepoOptions): Promise<Repository> {
  return openRepositoryAt(repoPath(positional, opts), opts.passwordFile);
}

function print(opts: RepoOptions, value: unknown, lines: () => string[]): void {
  if (opts.json) printJson(value);
  else process.stdout.write(lines().map((l) => `${l}\n`).join(''));
}

function parseSize(value: string): number {
  const match = /^(\d+)([KMG]?)(i?B)?$/i.exec(value.trim());
  if (!match) throw new SnapshiftError('USAGE', `bad size "${value}" (e.g. 1M, 256K)`);
  const unit = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[match[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Number(match[1]) * unit;
}

const mib = (bytes: number): string => `${(bytes / 1024 / 1024).toFixed(1)} MiB`;

export function registerRepoCommands(program: Command): void {
  /** `[repository]` and --repo, the same on every repository command, plus --password-file. */
  const withRepo = (command: Command): Command =>
    command
      .argument('[repository]', 'repository path (or --repo PATH; default $SNAPSHIFT_REPOSITORY)')
      .option('--repo <path>', 'repository path, as the positional argument (default $SNAPSHIFT_REPOSITORY)')
      .option('--password-file <file>', 'file holding the password (default $SNAPSHIFT_PASSWORD or a prompt)');
  const repo = withExamples(
    program.command('repo').description('create and inspect repositories, manage their passwords; each takes the repository as PATH or --repo PATH'),
    'snapshift repo init /srv/backups',
    'snapshift repo info /srv/backups',
    'snapshift repo list --repo /srv/backups --vm vm1',
  );

  withExamples(
    withRepo(repo.command('init'))
      .description('create a repository (encrypted unless --no-encryption)')
      .option('--no-encryption', 'store data unencrypted (only if you really mean it)')
      .option('--chunk-size <size>', 'chunk size, a power of two from 256K to 8M', '1M')
      .option('--compression <kind>', 'none, zstd or zstd:N', 'zstd:1'),
    'snapshift repo init /srv/backups --password-file /root/.repo-pass',
    'snapshift repo init --repo /srv/backups --chunk-size 4M --compression zstd:3',
  )
    .action(async (positional: string | undefined, opts: RepoOptions & { encryption: boolean; chunkSize: string; compression: string }) => {
      const path = repoPath(positional, opts);
      const password = opts.encryption ? await resolvePassword({ passwordFile: opts.passwordFile, prompt: 'new repository password: ', confirm: true }) : undefined;
      await initRepository(path, { password, encryption: opts.encryption, chunkSizeBytes: parseSize(opts.chunkSize), compression: opts.compression });
      process.stdout.write(`created ${opts.encryption ? 'encrypted' : 'UNENCRYPTED'} repository at ${resolve(path)}\n`);
    });

  withExamples(withRepo(repo.command('info').description('show a repository\'s format and size').option('--json', 'print JSON')), 'snapshift repo info /srv/backups', 'snapshift repo info --repo /srv/backups --json')
    .action(async (positional: string | undefined, opts: RepoOptions) => {
      await using repository = await open(positional, opts);
      const info = await repositoryInfo(repository);
      print(opts, info, () => [
        `repository ${info.path} (id ${info.id}, format v${info.version})`,
        `chunk size ${info.chunkSizeBytes / 1024} KiB, compression ${info.compression}, encryption ${info.encryption}`,
        `${info.restorePoints} restore point(s), ${info.chunks} chunk(s) in ${info.packs} pack(s), ${mib(info.packBytes)}`,
        `index in memory ${mib(info.indexMemoryBytes)}`,
      ]);
    });

  withExamples(withRepo(repo.command('list').description('list restore points').option('--vm <name>', 'only this VM').option('--json', 'print JSON')), 'snapshift repo list /srv/backups', 'snapshift repo list --repo /srv/backups --vm vm1 --json')
    .action(async (positional: string | undefined, opts: RepoOptions & { vm?: string }) => {
      await using repository = await open(positional, opts);
      const points = await repository.listRestorePoints(opts.vm);
      print(opts, points, () => points.map((p) => `${p.id.slice(0, 12)}  ${p.createdAt}  ${p.vmName}  ${p.disks.map((d) => `${d.name}:${mib(d.sizeBytes)}`).join(' ')}`));
    });

  withExamples(withRepo(repo.command('repair-index').description('rebuild the index from the pack trailers (exclusive lock); packs whose trailer cannot be read are reported, not deleted').option('--json', 'print JSON')), 'snapshift repo repair-index /srv/backups')
    .action(async (positional: string | undefined, opts: RepoOptions) => {
      await using repository = await open(positional, opts);
      const report = await repairIndex(repository);
      print(opts, report, () => [
        ...report.damagedPacks.map((d) => `warning: the trailer of pack ${d.pack} cannot be read (${d.reason}); the pack is left in place, its chunks are ${d.keptFromOldIndex ? 'indexed from the old index' : 'in no index (run "snapshift check")'}`),
        `read ${report.packsRead} pack(s): indexed ${report.packsIndexed} pack(s), ${report.chunksIndexed} chunk(s) in ${report.indexFilesWritten} new index file(s); removed ${report.indexFilesRemoved} old index file(s)`,
      ]);
      if (report.damagedPacks.length > 0) process.exitCode = 1;
    });

  const key = withExamples(repo.command('key').description('several passwords can open one repository'), 'snapshift repo key add /srv/backups --new-password-file /root/.second-pass', 'snapshift repo key list /srv/backups');
  withExamples(withRepo(key.command('add').description('add a password (new one from --new-password-file, $SNAPSHIFT_NEW_PASSWORD or a prompt)').option('--new-password-file <file>', 'file holding the new password')), 'snapshift repo key add /srv/backups --new-password-file /root/.second-pass')
    .action(async (positional: string | undefined, opts: RepoOptions & { newPasswordFile?: string }) => {
      await using repository = await open(positional, opts);
      const newPassword = await resolvePassword({ passwordFile: opts.newPasswordFile, envName: 'SNAPSHIFT_NEW_PASSWORD', prompt: 'new password: ', confirm: true });
      const added = await addKey(repository, newPassword);
      process.stdout.write(`added key ${added.id}\n`);
    });
  withExamples(withRepo(key.command('list').description('list key slots').option('--json', 'print JSON')), 'snapshift repo key list /srv/backups')
    .action(async (positional: string | undefined, opts: RepoOptions) => {
      await using repository = await open(positional, opts);
      const keys = await listKeys(repository);
      print(opts, keys, () => keys.map((k) => `${k.id}  ${k.createdAt}  ${k.user}@${k.host}  ${k.kdf}`));
    });
  withExamples(withRepo(key.command('remove').argument('<id>', 'key slot id or a unique prefix (see "repo key list")').description('remove a key slot (not the last one)')), 'snapshift repo key remove 3f2a9c1e /srv/backups')
    .action(async (id: string, positional: string | undefined, opts: RepoOptions) => {
      await using repository = await open(positional, opts);
      await removeKey(repository, id);
      process.stdout.write(`removed key ${id}\n`);
    });

  withExamples(withRepo(program.command('check').description('verify a repository (a read-only one too, without a lock); --read-data also decrypts and re-hashes chunks')
    .option('--read-data [percent]', 'read and verify every chunk, or PERCENT of the packs (--read-data=10; name the repository first or with --repo, as a bare --read-data takes what follows as PERCENT)')
    .option('--json', 'print JSON')), 'snapshift check /srv/backups', 'snapshift check --repo /srv/backups --read-data=10')
    .action(async (positional: string | undefined, opts: RepoOptions & { readData?: string | boolean }) => {
      let readDataPercent: number | undefined;
      if (opts.readData !== undefined && opts.readData !== false) {
        readDataPercent = opts.readData === true ? 100 : parseCliNumber(String(opts.readData).replace(/%$/, ''), '--read-data', { integer: false, above: 0, max: 100, unit: 'percent of the packs' });
      }
      await using repository = await open(positional, opts);
      const report = await checkRepository(repository, { readDataPercent, onWarning: (message) => process.stderr.write(`snapshift: warning: ${message}\n`) });
      print(opts, report, () => [
        ...report.problems.map((p) => `error: ${p.message}`),
        ...report.warnings.map((w) => `warning: ${w}`),
        `${report.problems.length === 0 ? 'no errors' : `${report.problems.length} error(s)`} in ${report.restorePoints} restore point(s), ${report.packs} pack(s)${readDataPercent ? `; verified ${report.chunksVerified} chunk(s), ${mib(report.bytesVerified)}` : ''}`,
      ]);
      if (report.problems.length > 0) throw new SnapshiftError('REPO_CHECK_FAILED', `check found ${report.problems.length} error(s) in repository ${repository.path}`);
      if (report.warnings.length > 0) process.exitCode = 1;
    });

  withExamples(withRepo(program.command('forget').description('forget restore points that the retention policy does not keep (per VM); run gc to free space')
    .option('--keep-last <n>', 'keep the N newest', numberOption('--keep-last', { min: 0 }))
    .option('--keep-daily <n>', 'keep the newest of each of the last N days', numberOption('--keep-daily', { min: 0 }))
    .option('--keep-weekly <n>', 'keep the newest of each of the last N weeks', numberOption('--keep-weekly', { min: 0 }))
    .option('--keep-monthly <n>', 'keep the newest of each of the last N months', numberOption('--keep-monthly', { min: 0 }))
    .option('--vm <name>', 'only this VM')
    .option('--dry-run', 'list what would go, change nothing')
    .option('--json', 'print JSON')), 'snapshift forget /srv/backups --keep-last 7 --dry-run', 'snapshift forget --repo /srv/backups --keep-daily 7 --keep-weekly 4 --vm vm1')
    .action(async (positional: string | undefined, opts: RepoOptions & RetentionPolicy & { vm?: string; dryRun?: boolean }, command: Command) => {
      const policy: RetentionPolicy = { keepLast: opts.keepLast, keepDaily: opts.keepDaily, keepWeekly: opts.keepWeekly, keepMonthly: opts.keepMonthly };
      applyRetention([], policy); // a policy that keeps nothing is a usage error before anything opens
      await using repository = await open(positional, opts);
      const decisions = await forgetRestorePoints(repository, policy, { vmName: opts.vm, dryRun: opts.dryRun });
      if (!opts.dryRun) forgetInCatalog(command, decisions.filter((d) => !d.keep).map((d) => d.point.id));
      print(opts, decisions.map((d) => ({ id: d.point.id, vmName: d.point.vmName, createdAt: d.point.createdAt, keep: d.keep, reasons: d.reasons })), () => [
        ...decisions.map((d) => `${d.keep ? 'keep  ' : opts.dryRun ? 'would remove' : 'remove'} ${d.point.id.slice(0, 12)}  ${d.point.createdAt}  ${d.point.vmName}  ${d.reasons.join(', ')}`),
        `${decisions.filter((d) => !d.keep).length} restore point(s) ${opts.dryRun ? 'would be' : ''} forgotten; run "snapshift gc" to free their space`,
      ]);
    });

  withExamples(withRepo(program.command('gc').description('delete data no restore point needs and repack mostly-empty packs')
    .option('--safety-window <minutes>', 'leave unindexed packs younger than this alone', numberOption('--safety-window', { integer: false, min: 0, unit: 'minutes' }), 60)
    .option('--dry-run', 'report only')
    .option('--json', 'print JSON')), 'snapshift gc /srv/backups --dry-run', 'snapshift gc --repo /srv/backups')
    .action(async (positional: string | undefined, opts: RepoOptions & { safetyWindow: number; dryRun?: boolean }) => {
      const minutes = opts.safetyWindow;
      await using repository = await open(positional, opts);
      const report = await collectGarbage(repository, { safetyWindowMs: minutes * 60_000, dryRun: opts.dryRun });
      print(opts, report, () => [
        `${report.packsDeleted} pack(s) deleted, ${report.packsRepacked} repacked into ${report.packsWritten}, ${report.unindexedDeleted} unindexed removed`,
        `${mib(report.bytesBefore)} -> ${mib(report.bytesAfter)} in ${(report.durationMs / 1000).toFixed(1)} s`,
      ]);
    });
}
