package config

// ParseConfig wraps the parser for Go callers.
func ParseConfig(text string) map[string]string {
	p := NewParser(text)
	return p.Parse()
}
