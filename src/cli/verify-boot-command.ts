import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { defaultBootMarker, verifyBoot } from '../restore/vm/boot-verification.ts';
import { qemuConfigurationOf } from '../restore/vm/configuration-of.ts';
import { homeOf, printJson } from './context.ts';
import { withExamples } from './help-examples.ts';
import { readPointForServing } from './instant-recovery-commands.ts';
import { numberOption } from './number-option.ts';
import { repositoryOption, type RepositoryCliOptions } from './repository-access.ts';

/** `snapshift verify-boot`: does this restore point boot? (Veeam's SureBackup for one VM.) */
export function registerVerifyBootCommand(program: Command): void {
  withExamples(
    repositoryOption(
      program
        .command('verify-boot')
        .description(
          'boot a restore point through instant recovery, with no network and a new identity, wait for a console marker or the guest agent, ' +
            'report pass or fail with the boot time, and discard it all; exits 0 on pass',
        )
        .argument('<vm>', 'VM name')
        .option('--point <id>', 'restore point id or unique prefix, or "latest"', 'latest')
        .option('--marker <regex>', 'what the serial console prints once the guest is up', defaultBootMarker)
        .option('--timeout <seconds>', 'how long the guest may take to boot', numberOption('--timeout'), 300)
        .option('--json', 'print the verdict as JSON'),
    ),
    'snapshift verify-boot vm1 --point latest',
    "snapshift verify-boot vm1 --marker 'WORKLOAD_START' --timeout 60 --json",
  ).action(async (vmName: string, options: RepositoryCliOptions & { point: string; marker: string; timeout: number; json?: boolean }, command: Command) => {
    const timeoutMs = options.timeout * 1000;
    try {
      new RegExp(options.marker);
    } catch (error) {
      throw new SnapshiftError('USAGE', `--marker is not a regular expression: ${(error as Error).message}`);
    }
    const { point, repository, password } = await readPointForServing(command, options, vmName);
    const verdict = await verifyBoot({
      home: homeOf(command),
      point,
      configuration: qemuConfigurationOf(point),
      repository,
      ...(password !== undefined ? { password } : {}),
      marker: options.marker,
      timeoutMs,
    });
    if (options.json) printJson(verdict);
    else if (verdict.passed) console.log(`${vmName} restore point ${point.id} boots: ${verdict.detail} after ${verdict.bootMs} ms`);
    else console.log(`${vmName} restore point ${point.id} did NOT boot: ${verdict.detail}\nlast console lines:\n${verdict.consoleTail}`);
    if (!verdict.passed) throw new SnapshiftError('BOOT_VERIFICATION_FAILED', `restore point ${point.id} of ${vmName} did not boot: ${verdict.detail}`);
  });
}
