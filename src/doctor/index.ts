export { features, isFeature, requiredBy, probeMissingPath, type Check, type CheckResult, type DoctorReport, type Feature, type Probe } from './check.ts';
export { checks } from './checks.ts';
export { runDoctor, formatDoctorReport, type DoctorOptions } from './doctor.ts';
export { probeEnvironmentOfProcess, type ProbeEnvironment } from './probes.ts';
