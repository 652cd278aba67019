//! The consumer's client configuration: the librdkafka properties that `config` built and checked
//! ([`crate::config::kafka_properties`]), applied to an rdkafka `ClientConfig`.

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;

/// The librdkafka properties of the worker's consumer, as `config` built and checked them: the
/// worker's own, then the configured ones.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (key, value) in &config.properties {
        cc.set(key, value);
    }
    cc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rdkafka::consumer::BaseConsumer;

    #[test]
    fn tls_and_sasl_properties_pass_through_to_a_client_that_accepts_them() {
        let vars: Vec<(String, String)> = [
            ("KAFKA_PROP_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_PROP_SASL_MECHANISMS", "SCRAM-SHA-512"),
            ("KAFKA_PROP_SASL_USERNAME", "worker"),
            ("KAFKA_PROP_SASL_PASSWORD", "secret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Config::from_vars(&vars).unwrap();
        let cc = consumer_config(&config.kafka);
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        let client: Result<BaseConsumer, _> = cc.create();
        assert!(client.is_ok(), "TLS and SCRAM are compiled in: {:?}", client.err());
    }

    #[test]
    fn an_unknown_property_is_refused_by_the_client() {
        let vars = vec![("KAFKA_PROP_NO_SUCH_THING".to_string(), "1".to_string())];
        let config = Config::from_vars(&vars).unwrap();
        let client: Result<BaseConsumer, _> = consumer_config(&config.kafka).create();
        assert!(client.is_err());
    }
}
