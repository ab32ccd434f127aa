// The lab's processes are recorded like any process the engine owns (core/owned-process.ts).
export { readCmdline, isOwnedProcessAlive, waitForExit, endOwnedProcess, sleep } from '../core/owned-process.ts';
