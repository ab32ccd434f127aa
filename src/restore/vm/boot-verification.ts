import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { isOwnedProcessAlive, sleep } from '../../core/owned-process.ts';
import { GuestAgent } from '../../hypervisor/qemu/guest-agent.ts';
import type { QemuVmConfiguration } from '../../hypervisor/hypervisor.ts';
import type { RestorePointSummary } from '../../repository/index.ts';
import { startInstantRecovery, stopInstantRecovery } from '../instant/instant-recovery.ts';
import { launchFiles } from './qemu-launch.ts';

/** A serial console's login prompt: what a booted Linux guest with a getty on ttyS0 prints. */
export const defaultBootMarker = 'login:';

export interface VerifyBootOptions {
  home: string;
  point: RestorePointSummary;
  configuration: QemuVmConfiguration;
  repository: string;
  password?: string;
  /** A regular expression the console (serial port 0) must print; the guest agent's ping counts too. */
  marker: string;
  timeoutMs: number;
}

export interface BootVerification {
  vm: string;
  restorePoint: string;
  passed: boolean;
  /** From the start of the recovery to the marker (or the agent's answer); null when it never came. */
  bootMs: number | null;
  /** What proved it: the console marker, or the guest agent's answer to guest-ping. */
  method: 'console-marker' | 'guest-agent' | null;
  detail: string;
  /** The last console lines, for a failed verification. */
  consoleTail: string;
}

/**
 * Veeam's SureBackup, for one restore point: boots it through instant recovery with no network and a new
 * identity beside the original, waits for the console marker or the guest agent, then discards it all
 * (nothing the verification VM wrote survives, nothing of it keeps running).
 */
export async function verifyBoot(options: VerifyBootOptions): Promise<BootVerification> {
  const { point } = options;
  const name = `${point.vmName}-verify-${randomBytes(3).toString('hex')}`;
  const marker = new RegExp(options.marker);
  const started = Date.now();
  const record = await startInstantRecovery({
    home: options.home,
    point,
    configuration: options.configuration,
    repository: options.repository,
    ...(options.password !== undefined ? { password: options.password } : {}),
    name,
    newIdentity: true,
    network: 'none',
    purpose: 'boot-verification',
  });
  const files = launchFiles(record.vm.runDir);
  const consolePath = files.serial(0, 'file');
  const readConsole = () => fs.readFile(consolePath, 'utf8').catch(() => '');
  const result = (passed: boolean, method: BootVerification['method'], detail: string, console: string): BootVerification => ({
    vm: point.vmName,
    restorePoint: point.id,
    passed,
    bootMs: passed ? Date.now() - started : null,
    method,
    detail,
    consoleTail: console.split('\n').slice(-8).join('\n'),
  });
  try {
    const deadline = started + options.timeoutMs;
    for (;;) {
      const console = await readConsole();
      if (marker.test(console)) return result(true, 'console-marker', `the console printed /${options.marker}/`, console);
      if (options.configuration.guestAgent && (await agentAnswers(files.agentSocket))) return result(true, 'guest-agent', 'the guest agent answered guest-ping', console);
      if (!(await isOwnedProcessAlive(record.vm))) return result(false, null, 'the VM stopped before it booted (QEMU exited)', console);
      if (Date.now() > deadline) return result(false, null, `no /${options.marker}/ on the console${options.configuration.guestAgent ? ' and no answer from the guest agent' : ''} within ${options.timeoutMs} ms`, console);
      await sleep(200);
    }
  } finally {
    await stopInstantRecovery(options.home, name);
  }
}

async function agentAnswers(socketPath: string): Promise<boolean> {
  try {
    await using agent = await GuestAgent.connect(socketPath, 1_000);
    await agent.execute('guest-ping', undefined, 1_000);
    return true;
  } catch {
    return false;
  }
}
