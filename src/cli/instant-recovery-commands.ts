import { resolve } from 'node:path';
import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import type { RestorePointSummary } from '../repository/index.ts';
import { migrateInstantRecovery } from '../restore/instant/instant-migrate.ts';
import { resumeInstantRecovery, startInstantRecovery, statusOf, stopInstantRecovery, type InstantRecoveryStatus } from '../restore/instant/instant-recovery.ts';
import { listRecords, readRecord } from '../restore/instant/recovery-state.ts';
import { qemuConfigurationOf } from '../restore/vm/configuration-of.ts';
import { launchFiles } from '../restore/vm/qemu-launch.ts';
import { homeOf, openCatalog, printJson } from './context.ts';
import { formatColumns } from './format.ts';
import { withExamples } from './help-examples.ts';
import { ProgressBar } from './progress.ts';
import { openRepositoryForChild, repositoryOption, type RepositoryCliOptions } from './repository-access.ts';
import { resolvePoint } from './restore-command.ts';

/** `snapshift instant-recovery start|list|stop|resume|migrate`: a VM running straight from its backup. */
export function registerInstantRecoveryCommands(program: Command): void {
  const group = withExamples(
    program
      .command('instant-recovery')
      .description('run a VM straight from a restore point (its disks served over NBD, writes kept in local overlays), then move it to a datastore or discard it'),
    'snapshift instant-recovery start vm1 --point latest',
    'snapshift instant-recovery list',
    'snapshift instant-recovery migrate vm1 --to-datastore /srv/vms',
    'snapshift instant-recovery stop vm1',
  );

  withExamples(
    repositoryOption(
      group
        .command('start')
        .description('boot the VM of a restore point at once, reading its disks from the repository; returns once QEMU runs it')
        .argument('<vm>', 'VM name')
        .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
        .option('--name <name>', 'name of the recovered VM (default: the VM\'s); a new name also gives it a new UUID and MAC addresses')
        .option('--network <mode>', 'none (no NICs) or user (QEMU user networking on each NIC)', 'none')
        .option('--json', 'print the recovery as JSON'),
    ),
    'snapshift instant-recovery start vm1 --point latest',
    'snapshift instant-recovery start vm1 --point 3f2a --name vm1-recovered --network user --json',
  ).action(async (vmName: string, options: RepositoryCliOptions & { point: string; name?: string; network: string; json?: boolean }, command: Command) => {
    if (options.network !== 'none' && options.network !== 'user') throw new SnapshiftError('USAGE', `--network wants none or user, not "${options.network}"`);
    const home = homeOf(command);
    const { point, repository, password } = await readPointForServing(command, options, vmName);
    const started = Date.now();
    const record = await startInstantRecovery({
      home,
      point,
      configuration: qemuConfigurationOf(point),
      repository,
      ...(password !== undefined ? { password } : {}),
      name: options.name ?? vmName,
      newIdentity: options.name !== undefined && options.name !== vmName,
      network: options.network,
      purpose: 'recovery',
    });
    const files = launchFiles(record.vm.runDir);
    const result = { ...summaryOf(record), startMs: Date.now() - started, consoleLog: files.serial(0, 'file') };
    if (options.json) return printJson(result);
    console.log(`${record.name} runs from restore point ${record.restorePoint} (${record.pointCreatedAt}) in ${result.startMs} ms: QEMU pid ${record.vm.pid}, QMP ${record.vm.qmpSocketPath}`);
    console.log(`its writes go to ${record.disks.map((disk) => disk.overlayPath).join(', ')}; "snapshift instant-recovery migrate ${record.name} --to-datastore DIR" keeps it, "stop" discards it`);
  });

  withExamples(
    group.command('list').description('the instant recoveries and boot verifications that run, with the state of their VM and server').option('--json', 'print them as JSON'),
    'snapshift instant-recovery list --json',
  ).action(async (options: { json?: boolean }, command: Command) => {
    const statuses: InstantRecoveryStatus[] = [];
    for (const record of await listRecords(homeOf(command))) statuses.push(await statusOf(record));
    if (options.json) return printJson(statuses.map(statusSummary));
    if (statuses.length === 0) return console.log('no instant recoveries run');
    console.log(
      formatColumns(
        ['NAME', 'VM', 'RESTORE POINT', 'STARTED', 'VM STATE', 'SERVER', 'PURPOSE'],
        statuses.map((status) => [
          status.record.name,
          status.record.sourceVm,
          status.record.restorePoint.slice(0, 12),
          status.record.startedAt,
          status.vmRunning ? (status.vmStatus ?? 'running (busy monitor)') : 'gone',
          status.serverRunning ? 'serving' : 'DOWN',
          status.record.purpose,
        ]),
      ),
    );
  });

  withExamples(
    group.command('stop').description("power the recovered VM off and discard its writes; stops serving the restore point").argument('<name>', 'recovered VM name').option('--json', 'print the result as JSON'),
    'snapshift instant-recovery stop vm1',
  ).action(async (name: string, options: { json?: boolean }, command: Command) => {
    const record = await stopInstantRecovery(homeOf(command), name);
    if (options.json) return printJson({ stopped: record.name, restorePoint: record.restorePoint });
    console.log(`stopped ${record.name}: its VM is off, its writes discarded, restore point ${record.restorePoint} no longer served`);
  });

  withExamples(
    repositoryOption(
      group
        .command('resume')
        .description('serve the restore point again after the NBD server died, and continue a guest paused on a failed read')
        .argument('<name>', 'recovered VM name')
        .option('--json', 'print the state as JSON'),
    ),
    'snapshift instant-recovery resume vm1',
  ).action(async (name: string, options: RepositoryCliOptions & { json?: boolean }, command: Command) => {
    const home = homeOf(command);
    const record = await readRecord(home, name);
    if (!record) throw new SnapshiftError('INSTANT_RECOVERY_UNKNOWN', `no instant recovery named ${name} (snapshift instant-recovery list shows what runs)`);
    using catalog = openCatalog(command);
    const opened = await openRepositoryForChild({ ...options, repo: options.repo ?? record.repository }, catalog, record.sourceVm);
    await opened.repository.close();
    const status = await resumeInstantRecovery(home, name, opened.password);
    if (options.json) return printJson(statusSummary(status));
    console.log(`${name}: server ${status.serverRunning ? 'serving' : 'DOWN'}, VM ${status.vmStatus ?? (status.vmRunning ? 'running' : 'gone')}`);
  });

  withExamples(
    group
      .command('migrate')
      .description('move a running recovered VM onto a datastore while it runs (block mirror, then a pivot); it keeps running there and is registered as a QEMU VM')
      .argument('<name>', 'recovered VM name')
      .requiredOption('--to-datastore <dir>', 'folder for the VM: its disks go to <dir>/<name>/<disk>.qcow2, with its launch unit (start.sh, launch.json)')
      .option('--json', 'print the result as JSON')
      .option('--quiet', 'no progress bar'),
    'snapshift instant-recovery migrate vm1 --to-datastore /srv/vms',
  ).action(async (name: string, options: { toDatastore: string; json?: boolean; quiet?: boolean }, command: Command) => {
    const home = homeOf(command);
    const bar = new ProgressBar(!options.json && !options.quiet, `migrate ${name}`);
    let result;
    try {
      result = await migrateInstantRecovery(home, name, { datastore: resolve(options.toDatastore), onProgress: (done, total) => bar.update(done, total, 'copy') });
    } finally {
      bar.stop();
    }
    using catalog = openCatalog(command);
    catalog.addQemuVm({ name, qmpSocketPath: result.qmpSocketPath });
    if (options.json) return printJson(result);
    console.log(`${name} now runs on ${result.disks.map((disk) => disk.path).join(', ')} (moved in ${result.durationMs} ms); start it again later with ${result.launchUnit.startScript}`);
  });
}

/**
 * The restore point a command will have served by a process of its own, with the repository's path and
 * password for that process; the repository itself is closed again.
 */
export async function readPointForServing(
  command: Command,
  options: RepositoryCliOptions & { point: string },
  vmName: string,
): Promise<{ point: RestorePointSummary; repository: string; password: string | undefined }> {
  using catalog = openCatalog(command);
  const pointId = resolvePoint(catalog, vmName, options.point);
  const opened = await openRepositoryForChild(options, catalog, vmName);
  try {
    const point = (await opened.repository.openRestorePoint(pointId)).summary;
    if (point.vmName !== vmName) throw new SnapshiftError('USAGE', `restore point ${point.id} belongs to ${point.vmName}, not ${vmName}`);
    return { point, repository: opened.path, password: opened.password };
  } finally {
    await opened.repository.close();
  }
}

function summaryOf(record: Awaited<ReturnType<typeof startInstantRecovery>>) {
  return {
    name: record.name,
    vm: record.sourceVm,
    restorePoint: record.restorePoint,
    pointCreatedAt: record.pointCreatedAt,
    startedAt: record.startedAt,
    purpose: record.purpose,
    qemuPid: record.vm.pid,
    qmpSocket: record.vm.qmpSocketPath,
    serverPid: record.server.pid,
    nbdSocket: record.server.socketPath,
    disks: record.disks.map((disk) => ({ name: disk.name, sizeBytes: disk.sizeBytes, overlay: disk.overlayPath })),
  };
}

function statusSummary(status: InstantRecoveryStatus) {
  return { ...summaryOf(status.record), vmRunning: status.vmRunning, vmStatus: status.vmStatus, serverRunning: status.serverRunning };
}
