import { SnapshiftError } from '../../core/errors.ts';
import { QmpClient } from './qmp-client.ts';

/** Connects to a QEMU process's QMP socket, naming the VM in any error. */
export async function connectQmp(vmName: string, qmpSocketPath: string, timeoutMs: number): Promise<QmpClient> {
  try {
    return await QmpClient.connect(qmpSocketPath, { timeoutMs });
  } catch (error) {
    const code = error instanceof SnapshiftError ? error.code : 'QMP_CONNECT_FAILED';
    throw new SnapshiftError(code, `VM ${vmName}: ${(error as Error).message}`, { cause: error });
  }
}
