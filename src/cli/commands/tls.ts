import { daysLeft, renewServerTls, serverTls, TLS_RENEW_WITHIN_DAYS, type ServerTls } from '../../authority/server-tls.js';
import { withAuthority } from '../context.js';
import { actor, flag, list, out, str, type Command } from '../io.js';

function describe(tls: ServerTls): string {
  return [
    `serial      ${tls.serial}`,
    `issuer      ${tls.issuer}`,
    `not after   ${tls.notAfter.toISOString()} (${Math.floor(daysLeft(tls.notAfter))} days left)`,
    `DNS names   ${tls.dnsNames.join(', ') || '-'}`,
    `IP          ${tls.ipAddresses.join(', ') || '-'}`,
  ].join('\n');
}

const asJson = (tls: ServerTls): string => JSON.stringify({ serial: tls.serial, issuer: tls.issuer, notAfter: tls.notAfter.toISOString(), daysLeft: Math.floor(daysLeft(tls.notAfter)), dnsNames: tls.dnsNames, ipAddresses: tls.ipAddresses }, null, 2);

export const tlsStatusCommand: Command = {
  name: 'tls status',
  summary: "the authority's own HTTPS certificate (EST, admin API): names, issuer, days left",
  usage: `Usage: hallmark tls status [--json] [--home DIR] [--passphrase-file FILE]

Shows <home>/tls/server.pem's certificate and checks that it belongs to the configured TLS key.
hallmark serve renews it by itself when fewer than ${TLS_RENEW_WITHIN_DAYS} days are left.`,
  options: { json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    return withAuthority(args, async (authority) => {
      const tls = await serverTls(authority);
      out(flag(args, 'json') ? asJson(tls) : describe(tls));
      return 0;
    });
  },
};

export const tlsRenewCommand: Command = {
  name: 'tls renew',
  summary: "a new key and certificate for the authority's own HTTPS listener (other names: --dns/--ip)",
  usage: `Usage: hallmark tls renew [--dns NAME]... [--ip ADDRESS]... [--ca NAME] [--json] [--home DIR] [--passphrase-file FILE]

Makes a new key, has the default issuing CA (or --ca) issue a tls-server certificate for it, and
installs both (<home>/tls/server.pem and the configuration). --dns / --ip replace the names (default:
keep the current ones). A running hallmark serve picks the new certificate up within its check
interval (an hour) without a restart; it also renews by itself within ${TLS_RENEW_WITHIN_DAYS} days of expiry.`,
  options: { dns: { type: 'string', multiple: true }, ip: { type: 'string', multiple: true }, ca: { type: 'string' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    return withAuthority(args, async (authority) => {
      const dns = list(args, 'dns');
      const ip = list(args, 'ip');
      const tls = await renewServerTls(authority, { dnsNames: dns.length ? dns : undefined, ipAddresses: ip.length ? ip : undefined, ca: str(args, 'ca'), actor: actor() });
      out(flag(args, 'json') ? asJson(tls) : `TLS certificate renewed\n${describe(tls)}`);
      return 0;
    });
  },
};
