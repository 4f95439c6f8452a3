// The `hallmark` command.

import { HallmarkError, isHallmarkError } from '../errors.js';
import { auditListCommand, auditVerifyCommand } from './commands/audit.js';
import { caExportCommand, caInstallCommand, caListCommand, caRequestCommand } from './commands/ca.js';
import { initCommand } from './commands/init.js';
import { issueCommand } from './commands/issue.js';
import { rootCrlCommand, rootInstallCrlCommand, rootInstallRolloverCommand, rootRevokeCommand, rootRolloverCommand, rootSignCommand } from './commands/root.js';
import { serveCommand } from './commands/serve.js';
import { tokenCreateCommand, tokenListCommand, tokenRevokeCommand } from './commands/token.js';
import { UsageError, parse, type Command } from './io.js';
import { batchCreateCommand, batchListCommand, lineCreateCommand, lineListCommand, lineMoveCommand, productCreateCommand, productListCommand } from './commands/registry.js';
import { deviceDecommissionCommand, deviceListCommand, deviceRegisterCommand, deviceResumeCommand, deviceShowCommand, deviceSuspendCommand, deviceTransferCommand } from './commands/device.js';
import { vendorAddCommand, vendorListCommand } from './commands/vendor.js';
import { manifestImportCommand, manifestSignCommand } from './commands/manifest.js';
import { revokeCommand } from './commands/revoke.js';
import { claimCreateCommand, claimListCommand, claimRevokeCommand } from './commands/claim.js';
import { enrolmentApproveCommand, enrolmentListCommand, enrolmentRejectCommand } from './commands/enrolment.js';
import { agentEnrollCommand, agentReenrollCommand, agentRunCommand } from './commands/agent.js';
import { crlShowCommand } from './commands/crl.js';
import { webhookAddCommand, webhookDeliveriesCommand, webhookDisableCommand, webhookListCommand, webhookRetryCommand } from './commands/webhook.js';
import { expiryCommand } from './commands/expiry.js';
import { connectCheckCommand } from './commands/connect.js';
import { brokerMosquittoCommand, brokerMosquittoCrlCommand } from './commands/broker.js';
import { demoCommand } from './commands/demo.js';
import { simulateCommand } from './commands/simulate.js';
import { productPolicyCommand } from './commands/product-policy.js';
import { stationExportCommand, stationInitCommand, stationSignCommand, stationStatusCommand } from './commands/station-offline.js';
import { stationCreateCommand, stationImportCommand, stationInstallCommand, stationListCommand } from './commands/station-online.js';
import { stampFlashedCommand, stampGenerateCommand, stampStatusCommand } from './commands/stamp.js';
import { stampFactoryKeyCommand, stampInspectCommand, stampOpenCommand } from './commands/stamp-files.js';
import { tlsRenewCommand, tlsStatusCommand } from './commands/tls.js';

const COMMANDS: readonly Command[] = [
  initCommand, caListCommand, caExportCommand, caRequestCommand, caInstallCommand, rootSignCommand,
  rootRolloverCommand, rootInstallRolloverCommand, rootRevokeCommand, rootCrlCommand, rootInstallCrlCommand,
  issueCommand, tokenCreateCommand, tokenListCommand, tokenRevokeCommand, auditVerifyCommand, auditListCommand, serveCommand,
  productCreateCommand, productListCommand, lineCreateCommand, lineListCommand, lineMoveCommand, batchCreateCommand, batchListCommand,
  deviceRegisterCommand, deviceShowCommand, deviceListCommand, deviceTransferCommand, deviceSuspendCommand, deviceResumeCommand, deviceDecommissionCommand,
  vendorAddCommand, vendorListCommand, manifestImportCommand, manifestSignCommand,
  revokeCommand, claimCreateCommand, claimListCommand, claimRevokeCommand, enrolmentListCommand, enrolmentApproveCommand, enrolmentRejectCommand,
  agentEnrollCommand, agentReenrollCommand, agentRunCommand, crlShowCommand,
  webhookAddCommand, webhookListCommand, webhookDeliveriesCommand, webhookDisableCommand, webhookRetryCommand, expiryCommand,
  brokerMosquittoCommand, brokerMosquittoCrlCommand,
  connectCheckCommand,
  demoCommand,
  simulateCommand,
  productPolicyCommand,
  stationCreateCommand, stationInstallCommand, stationImportCommand, stationListCommand,
  stationInitCommand, stationSignCommand, stationExportCommand, stationStatusCommand,
  stampGenerateCommand, stampStatusCommand, stampFlashedCommand,
  stampInspectCommand, stampFactoryKeyCommand, stampOpenCommand,
  tlsStatusCommand, tlsRenewCommand,
];

function overview(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length));
  return `Usage: hallmark <command> [options]   (hallmark <command> --help for details)

Hallmark — device identity authority for IoT fleets.

Commands:
${COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`).join('\n')}

Environment: HALLMARK_HOME (default ./hallmark-data), HALLMARK_PASSPHRASE, HALLMARK_ROOT_PASSPHRASE,
HALLMARK_PKCS11_PIN, HALLMARK_DATABASE_URL (postgres://… to use PostgreSQL instead of SQLite),
HALLMARK_LOG_LEVEL.`;
}

export async function main(argv: string[]): Promise<number> {
  if (argv.length === 0 || argv[0] === '--help' || argv[0] === '-h' || argv[0] === 'help') {
    process.stdout.write(overview() + '\n');
    return argv.length === 0 ? 2 : 0;
  }
  // Longest match: "ca list" before "ca".
  const two = `${argv[0]} ${argv[1] ?? ''}`;
  const command = COMMANDS.find((c) => c.name === two) ?? COMMANDS.find((c) => c.name === argv[0]);
  if (!command) {
    const group = COMMANDS.filter((c) => c.name.startsWith(`${argv[0]} `));
    if (group.length) {
      process.stderr.write(`hallmark ${argv[0]}: choose one of: ${group.map((c) => c.name).join(', ')}\n`);
      return 2;
    }
    process.stderr.write(`hallmark: unknown command ${JSON.stringify(argv[0])}\n\n${overview()}\n`);
    return 2;
  }
  const rest = argv.slice(command.name.split(' ').length);
  try {
    const args = parse(command, rest);
    if (args === 'help') {
      process.stdout.write(`hallmark ${command.name} — ${command.summary}\n\n${command.usage}\n`);
      return 0;
    }
    return await command.run(args);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`hallmark ${command.name}: ${err.message}\n`);
      return 2;
    }
    const e = isHallmarkError(err) ? err : toCliError(err);
    process.stderr.write(`hallmark ${command.name}: ${e.message} [${e.code}]\n`);
    if (process.env.HALLMARK_DEBUG && e.cause) process.stderr.write(`${String((e.cause as Error).stack ?? e.cause)}\n`);
    return 1;
  }
}

function toCliError(err: unknown): HallmarkError {
  const e = err as { code?: string; message?: string };
  if (['ECONNREFUSED', 'ENOTFOUND', 'ETIMEDOUT', '3D000', '28P01'].includes(e?.code ?? '')) {
    return new HallmarkError('DATABASE_UNAVAILABLE', `database unavailable: ${e.message}`, { cause: err });
  }
  return new HallmarkError('INTERNAL', `unexpected error: ${e?.message ?? String(err)}`, { cause: err });
}
