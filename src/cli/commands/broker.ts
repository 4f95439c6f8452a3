// hallmark broker mosquitto: a Mosquitto configuration for devices with Hallmark identities;
// hallmark broker mosquitto-crl: rewrite its CRL file and make the running broker reload it.

import { MOSQUITTO_FILES, refreshMosquittoCrl, writeMosquittoConfig } from '../../broker/mosquitto.js';
import { withAuthority } from '../context.js';
import { actor, info, intOption, list, out, required, str, type Command } from '../io.js';

export const brokerMosquittoCommand: Command = {
  name: 'broker mosquitto',
  summary: 'write a Mosquitto configuration: mutual TLS with Hallmark identities, per-device ACL, CRL',
  usage: `Usage: hallmark broker mosquitto --out DIR [--port 8883] [--host 127.0.0.1] [--dns NAME]... [--ip ADDR]...
                                 [--user NAME] [--ca NAME] [--home DIR] [--passphrase-file FILE]

Writes into DIR: ${Object.values(MOSQUITTO_FILES).filter((f) => f !== MOSQUITTO_FILES.pid).join(', ')}.
The TLS listener requires a client certificate from Hallmark's CAs; the MQTT username is the
certificate's CN (the device UDID); the ACL lets a device write devices/<UDID>/# and read
devices/<UDID>/commands/#. A server certificate is issued for the broker (localhost, 127.0.0.1, plus
--dns/--ip) and its private key written to DIR/${MOSQUITTO_FILES.key} with mode 0600 — the broker's own
key, not a CA key. --user: the user Mosquitto switches to when started as root (default: you).
Keep DIR/${MOSQUITTO_FILES.crl} current with "hallmark serve --broker-dir DIR" or "hallmark broker mosquitto-crl".
Run: mosquitto -c DIR/${MOSQUITTO_FILES.config}`,
  options: { out: { type: 'string' }, port: { type: 'string' }, host: { type: 'string' }, dns: { type: 'string', multiple: true }, ip: { type: 'string', multiple: true }, user: { type: 'string' }, ca: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const dir = required(args, 'out', this.usage);
    return withAuthority(args, async (authority) => {
      const config = await writeMosquittoConfig(authority, {
        dir, port: intOption(args, 'port'), host: str(args, 'host'), dnsNames: list(args, 'dns'), ipAddresses: list(args, 'ip'),
        user: str(args, 'user'), ca: str(args, 'ca'), actor: actor(),
      });
      out(`Mosquitto configuration written to ${config.dir}`);
      out(`  broker certificate ${config.server.serial} (${config.server.subject}), key ${config.files.key} (0600)`);
      out(`  CRLs of ${config.crlCas.join(', ')} in ${config.files.crl}`);
      out(`Run: mosquitto -c ${config.files.config}`);
      return 0;
    });
  },
};

export const brokerMosquittoCrlCommand: Command = {
  name: 'broker mosquitto-crl',
  summary: 'rewrite a Mosquitto configuration\'s CRL file and signal the broker to reload it',
  usage: `Usage: hallmark broker mosquitto-crl --dir DIR [--home DIR] [--passphrase-file FILE]

Rewrites DIR/${MOSQUITTO_FILES.crl} atomically with the current full CRLs of the issuing CAs (a new full CRL
is made when revocations are waiting in the delta) and sends SIGHUP to the pid in DIR/${MOSQUITTO_FILES.pid}.
Run it at least daily (the CRLs expire) unless "hallmark serve --broker-dir DIR" keeps DIR current.`,
  options: { dir: { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const dir = required(args, 'dir', this.usage);
    return withAuthority(args, async (authority) => {
      const r = await refreshMosquittoCrl(authority, dir);
      out(`CRL file rewritten: ${r.cas.map((c, i) => `${c} #${r.numbers[i]}`).join(', ')}`);
      if (r.signalled !== undefined) out(`SIGHUP sent to mosquitto (pid ${r.signalled})`);
      else info('No running mosquitto found (no live pid in the pid file): nothing signalled.');
      return 0;
    });
  },
};
